#!/usr/bin/env bash
# vdiskd vs qemu-nbd vs nbdkit over NBD, one run, the same 1 GiB raw file
# (random data), the same fio jobs through fio's NBD engine (libnbd, Unix
# socket, one connection): 4 KiB randread and randwrite at QD32, 1 MiB
# sequential read at QD8.
#   buffered: vdiskd cache=writeback | qemu-nbd --cache=writeback --aio=io_uring -e 8 | nbdkit file
#   O_DIRECT: vdiskd cache=none      | qemu-nbd --cache=none --aio=io_uring -e 8 | fio io_uring --direct=1 locally
#   qcow2 (fully allocated, cache=none): vdiskd | qemu-nbd
# Prints a table with the ratios vdiskd / peer (above 1: vdiskd is faster).
#   RUNTIME=seconds per job (default 10), BENCH_DIR=where the images go,
#   SETUPS="buf direct qcow2" and JOBS="randread randwrite seqread" (default
#   all) to run a subset, REPEAT=n to run everything n times (servers
#   interleaved) and report medians; VDISK_POLL_NS=0 runs vdiskd without
#   polling (see docs/engines.md)
set -euo pipefail
cd "$(dirname "$0")/.."
VDISKD=${VDISKD:-$PWD/build/bin/vdiskd}
RT=${RUNTIME:-10}
W=${BENCH_DIR:-$PWD/build/bench/nbd}
mkdir -p "$W"
img=$W/img.raw
qimg=$W/img.qcow2
if [ ! -s "$img" ] || [ "$(stat -c %s "$img")" -ne 1073741824 ]; then
    echo "creating $img (1 GiB of random data)" >&2
    openssl enc -aes-128-ctr -pass pass:nbdbench -nosalt -pbkdf2 < <(head -c 1073741824 /dev/zero) > "$img" 2>/dev/null
fi
[ -s "$qimg" ] || qemu-img convert -f raw -O qcow2 "$img" "$qimg"
sock=$W/nbd.sock
srv=

stop() {
    [ -n "$srv" ] && { kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null || true; }
    srv=
    rm -f "$sock"
}
trap stop EXIT

waitsock() { for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done; echo "server did not start" >&2; exit 1; }

start() {   # vdiskd|qemu-nbd|nbdkit FILE FORMAT CACHE
    stop
    case $1 in
    vdiskd) "$VDISKD" --log-level=warning --nbd "unix:$sock" --export "file=$2,format=$3,cache=$4" & ;;
    qemu-nbd) qemu-nbd -t -f "$3" --cache="$4" --aio=io_uring -e 8 -k "$sock" "$2" & ;;
    nbdkit) nbdkit -f -U "$sock" file "$2" & ;;
    esac
    srv=$!
    waitsock
}

# job NAME -> fio arguments
jobargs() {
    case $1 in
    randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    seqread) echo "--rw=read --bs=1M --iodepth=8" ;;
    esac
}

# fio_run JOB ENGINE-ARGS... -> "IOPS MiB/s FIO-CPU-us-per-op" (fio's usr+sys)
fio_run() {
    local job=$1
    shift
    # shellcheck disable=SC2046
    fio --name="$job" $(jobargs "$job") --size=1G --runtime="$RT" --ramp_time=1 --time_based \
        --randrepeat=0 --norandommap --output-format=json "$@" 2>/dev/null |
        sed -n '/^{/,$p' |
        jq -r '.jobs[0] | (.usr_cpu + .sys_cpu) as $c | (if .read.io_bytes > 0 then .read else .write end) |
            "\(.iops|floor) \(.bw_bytes/1048576|floor) \(if .iops > 0 then ($c * 100000 / .iops | round) / 10 else 0 end)"'
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# nbd_run JOB -> "IOPS MiB/s SERVER-CPU-us-per-op FIO-CPU-us-per-op" (server CPU from
# /proc: robust when the machine is busy)
nbd_run() {
    local a b out
    a=$(cpu_ticks "$srv")
    out=$(fio_run "$1" --ioengine=nbd --uri="nbd+unix:///?socket=$sock")
    b=$(cpu_ticks "$srv")
    awk -v o="$out" -v d=$((b - a)) -v hz="$(getconf CLK_TCK)" -v rt="$RT" 'BEGIN {
        split(o, f, " "); ops = f[1] * (rt + 1); printf "%s %s %.1f %.1f", f[1], f[2], (ops > 0 ? d * 1e6 / hz / ops : 0), f[3] }'
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
SETUPS=${SETUPS:-buf direct qcow2}
JOBS=${JOBS:-randread seqread randwrite}
REPEAT=${REPEAT:-1}
want() { [[ " $SETUPS " == *" $1 "* ]]; }
declare -A R ALL
put() {   # KEY "IOPS MiB/s CPU": one more sample of KEY
    ALL[$1]="${ALL[$1]:-}${ALL[$1]:+;}$2"
    echo "$1 (run $rep): $2" >&2
}
# Each repetition runs every server in turn, so that a slow moment of the
# shared machine hits all of them; the table shows the median of each column.
for rep in $(seq "$REPEAT"); do
    if want buf; then
        cat "$img" > /dev/null   # the page cache holds the image for the buffered runs
        for s in vdiskd qemu-nbd nbdkit; do
            start "$s" "$img" raw writeback
            for j in $JOBS; do put "buf,$s,$j" "$(nbd_run "$j")"; done
        done
    fi
    if want direct; then
        for s in vdiskd qemu-nbd; do
            start "$s" "$img" raw none
            for j in $JOBS; do put "direct,$s,$j" "$(nbd_run "$j")"; done
        done
        stop
        for j in $JOBS; do
            put "direct,local,$j" "$(fio_run "$j" --ioengine=io_uring --direct=1 --filename="$img")"
        done
    fi
    if want qcow2; then
        for s in vdiskd qemu-nbd; do
            start "$s" "$qimg" qcow2 none
            for j in $JOBS; do put "qcow2,$s,$j" "$(nbd_run "$j")"; done
        done
    fi
    stop
done
for k in "${!ALL[@]}"; do
    R[$k]=$(tr ';' '\n' <<<"${ALL[$k]}" | awk '{ for (i = 1; i <= NF; i++) v[i, NR] = $i + 0; nf = NF; n = NR }
        END { for (i = 1; i <= nf; i++) {
                  for (r = 1; r <= n; r++) a[r] = v[i, r]
                  for (r = 2; r <= n; r++) for (q = r; q > 1 && a[q - 1] > a[q]; q--) { t = a[q]; a[q] = a[q - 1]; a[q - 1] = t }
                  m = n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
                  printf "%s%s", (i > 1 ? " " : ""), m } }')
done

val() { # KEY -> the figure that matters: IOPS for 4k jobs, MiB/s for seqread
    local v=${R[$1]:-}
    [ -n "$v" ] || { echo "-"; return; }
    case $1 in *seqread) awk '{print $2}' <<<"$v" ;; *) awk '{print $1}' <<<"$v" ;; esac
}
cpu() { awk '{print ($3 == "" ? "-" : $3)}' <<<"${R[$1]:-}"; }
fcpu() { awk '{print ($4 == "" ? "-" : $4)}' <<<"${R[$1]:-}"; }
ratio() { awk -v a="$(val "$1")" -v b="$(val "$2")" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
row() { [[ " $JOBS " == *" $2 "* ]] && want "$1"; }   # SETUP JOB: was it run
unit() { case $1 in seqread) echo "MiB/s" ;; *) echo "IOPS" ;; esac; }

echo
echo "fio --ioengine=nbd, one connection, ${RT}s per job, median of $REPEAT run(s), $(nproc) CPUs, $(uname -r)"
echo
echo "| setup | job | vdiskd | qemu-nbd | nbdkit / local | vdiskd/qemu-nbd | vdiskd/nbdkit or local |"
echo "|---|---|---|---|---|---|---|"
for j in randread randwrite seqread; do
    row buf $j || continue
    echo "| buffered raw | $j ($(unit $j)) | $(val buf,vdiskd,$j) | $(val buf,qemu-nbd,$j) | $(val buf,nbdkit,$j) | $(ratio buf,vdiskd,$j buf,qemu-nbd,$j) | $(ratio buf,vdiskd,$j buf,nbdkit,$j) |"
done
for j in randread randwrite seqread; do
    row direct $j || continue
    echo "| O_DIRECT raw | $j ($(unit $j)) | $(val direct,vdiskd,$j) | $(val direct,qemu-nbd,$j) | $(val direct,local,$j) | $(ratio direct,vdiskd,$j direct,qemu-nbd,$j) | $(ratio direct,vdiskd,$j direct,local,$j) |"
done
for j in randread randwrite seqread; do
    row qcow2 $j || continue
    echo "| qcow2 O_DIRECT | $j ($(unit $j)) | $(val qcow2,vdiskd,$j) | $(val qcow2,qemu-nbd,$j) | - | $(ratio qcow2,vdiskd,$j qcow2,qemu-nbd,$j) | - |"
done
echo
# cpu_table FIELD: a table of one per-request CPU figure (cpu or fcpu) by setup and server
cpu_table() {
    local f=$1 j
    echo
    echo "| setup | job | vdiskd | qemu-nbd | nbdkit |"
    echo "|---|---|---|---|---|"
    for j in randread randwrite seqread; do
        row buf $j && echo "| buffered raw | $j | $($f buf,vdiskd,$j) | $($f buf,qemu-nbd,$j) | $($f buf,nbdkit,$j) |"
    done
    for j in randread randwrite seqread; do
        row direct $j && echo "| O_DIRECT raw | $j | $($f direct,vdiskd,$j) | $($f direct,qemu-nbd,$j) | - |"
    done
    for j in randread randwrite seqread; do
        row qcow2 $j && echo "| qcow2 O_DIRECT | $j | $($f qcow2,vdiskd,$j) | $($f qcow2,qemu-nbd,$j) | - |"
    done
    echo
}
echo "Server CPU time per request (µs; user+system of the server process, from /proc):"
cpu_table cpu
echo "Client CPU time per request (µs; fio's usr+sys as fio reports it; libnbd's poll, recv"
echo "and send run in fio's job thread, so this is the client's cost of a request):"
cpu_table fcpu
echo "load average at the start: $load_start, at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
