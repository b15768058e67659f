#!/usr/bin/env bash
# RBD: 4 KiB random reads and writes at QD32 on one image of one throwaway
# cluster (tests/rbd/cluster.sh), in one run, through
#   vdiskd     (NBD export of rbd:POOL/IMAGE, fio --ioengine=nbd)
#   qemu-nbd   (QEMU's own rbd driver, fio --ioengine=nbd)
#   fio-rbd    (fio --ioengine=rbd: librbd in fio's process, the limit)
# Prints IOPS and CPU seconds (client = fio, server = vdiskd / qemu-nbd, osd)
# per case, and the ratios vdiskd / qemu-nbd and vdiskd / fio-rbd. Extra
# cases (TOOLS): vdiskd-mc, the same 32 requests in flight over two NBD
# connections (fio numjobs=2, iodepth=16); fio-rbd-same, fio's rbd engine
# with the librbd settings vdiskd uses.
#   RUNTIME=15  seconds per case     SIZE=1G  image size (prefilled)
#   VDISKD=build/bin/vdiskd          RBD_CONF=… use a running cluster instead
#   RBD_IMAGE=NAME  with RBD_CONF: an existing, filled image in pool rbd (kept)
#   RATE=N  cap each job at N IOPS (compare CPU per I/O at equal rates)
#   SPLIT=1 also print CPU per I/O by process and thread
#   RBD_OPTS=:KEY=VALUE…  Ceph options for vdiskd and qemu-nbd (appended to the name)
#   RWS="randread randwrite"         TOOLS="vdiskd qemu-nbd fio-rbd"  (subsets)
#   QUIET_CEPH=1  the cluster (and every client) without Ceph's in-memory
#                 debug logs and without the OSD's op tracker (less CPU in
#                 the OSD, which shares the CPUs; a second figure, not the
#                 default: the defaults are what clusters run)
set -euo pipefail
cd "$(dirname "$0")/.."
VDISKD=${VDISKD:-build/bin/vdiskd}
RUNTIME=${RUNTIME:-15}
SIZE=${SIZE:-1G}
dir=$PWD/build/bench/rbd
mkdir -p "$dir"
[ -x "$VDISKD" ] || { echo "bench/rbd.sh: build first ($VDISKD missing)" >&2; exit 1; }

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    [ -z "${RBD_CONF:-}" ] && tests/rbd/cluster.sh stop "$dir/ceph" >/dev/null 2>&1 || true
}
trap cleanup EXIT
if [ -n "${RBD_CONF:-}" ]; then
    conf=$RBD_CONF
else
    rm -rf "$dir/ceph"
    if [ "${QUIET_CEPH:-0}" = 1 ]; then
        export RBD_CEPH_CONF="osd enable op tracker = false"
        for sub in osd objecter rados rbd objectcacher memstore bluestore bdev rocksdb monc auth finisher \
                   asok throttle context buffer ms optracker heartbeatmap perfcounter; do
            RBD_CEPH_CONF+=$'\n'"debug $sub = 0/0"
        done
    fi
    conf=$(tests/rbd/cluster.sh start "$dir/ceph" rbd)
fi
osd=$(cat "$(dirname "$conf")/osd.pid" 2>/dev/null || echo)
img=${RBD_IMAGE:-bench$$}
export CEPH_CONF=$conf
name="rbd:rbd/$img:conf=$conf${RBD_OPTS:-}"
if [ -z "${RBD_IMAGE:-}" ]; then
    timeout 60 rbd -c "$conf" create "rbd/$img" --size "$SIZE"
    # prefill, so that reads find data everywhere
    timeout 600 fio --name=fill --ioengine=rbd --pool=rbd --rbdname="$img" --clientname=admin \
        --rw=write --bs=4M --iodepth=4 --size="$SIZE" > /dev/null
fi

# fio-rbd-same: fio's rbd engine with the librbd settings vdiskd gives its
# images (librados_thread_count=1; rbd_cache is on in both by default)
same=$dir/same.conf
sed 's/^\[client\]$/[client]\nlibrados thread count = 1/' "$conf" > "$same"

ticks=$(getconf CLK_TCK)
# "total idle" jiffies of the whole machine (idle + iowait), for the idle share of a case
idle_now() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6; exit }' /proc/stat; }
cpu_of() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && awk '{ print $14 + $15 }' "/proc/$1/stat" || echo 0; }

# runfio RW ENGINE-ARGS... : prints "iops client_cpu_s"
runfio() {
    local rw=$1 out; shift
    /usr/bin/time -o "$dir/time" -f '%U %S' \
        fio --name=b --rw="$rw" --bs=4k --iodepth=32 --size="$SIZE" --time_based --runtime="$RUNTIME" \
            --randrepeat=0 --norandommap --output-format=json ${RATE:+--rate_iops=$RATE} "$@" > "$dir/fio.out" 2>/dev/null
    out=$(sed -n '/^{/,$p' "$dir/fio.out")
    printf '%s %s\n' "$(jq '[.jobs[] | .read.iops + .write.iops] | add | floor' <<<"$out")" \
        "$(awk '{ printf "%.2f", $1 + $2 }' "$dir/time")"
}

# SPLIT=1: CPU per I/O by process and thread, sampled from 1 s into the
# case to 1 s before its end: "role/thread us" (role client = fio, server,
# osd; threads grouped by name, e.g. msgr-worker-N -> msgr-worker).
threads_of() {   # ROLE PID...
    local role=$1 p t; shift
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            [ -r "$t/stat" ] || continue
            printf '%s/%s %s\n' "$role" "$(tr ' ' _ < "$t/comm" | sed -E 's/-[0-9]+$//')" \
                "$(awk '{ print $14 + $15 }' "$t/stat" 2>/dev/null || echo 0)"
        done
    done
}
sample() {   # SERVER-PID : writes the window's ticks per role/thread to $dir/split
    local srv=$1
    sleep 1
    { threads_of client $(pgrep -x fio); threads_of server $srv; threads_of osd "$osd"; } > "$dir/split0"
    sleep $((RUNTIME - 2))
    { threads_of client $(pgrep -x fio); threads_of server $srv; threads_of osd "$osd"; } > "$dir/split1"
    awk 'NR == FNR { a[$1] -= $2; next } { a[$1] += $2 } END { for (k in a) if (a[k] > 0) print k, a[k] }' \
        "$dir/split0" "$dir/split1" | sort > "$dir/split"
}

# case TOOL RW : one line of results; sets R_IOPS
declare -A IOPS
one() {
    local tool=$1 rw=$2 srv= sock=$dir/nbd.sock s0 o0 res
    rm -f "$sock"
    case $tool in
    vdiskd|vdiskd-mc)
        "$VDISKD" --nbd "unix:$sock" --log-level=warning --export "name=b,file=$name,format=raw" 2> "$dir/vdiskd.log" &
        srv=$! ;;
    qemu-nbd)
        qemu-nbd -t -f raw --cache=writeback -x b -k "$sock" "$name" 2> "$dir/qemu-nbd.log" &
        srv=$! ;;
    esac
    if [ -n "$srv" ]; then
        pids+=("$srv")
        for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
        [ -S "$sock" ] || { echo "$tool did not start" >&2; cat "$dir/$tool.log" >&2; exit 1; }
    fi
    s0=$(cpu_of "$srv"); o0=$(cpu_of "$osd"); i0=$(idle_now)
    local sp=
    if [ "${SPLIT:-0}" = 1 ] && [ "$RUNTIME" -ge 4 ]; then sample "$srv" & sp=$!; fi
    if [ "$tool" = fio-rbd ]; then
        res=$(runfio "$rw" --ioengine=rbd --pool=rbd --rbdname="$img" --clientname=admin)
    elif [ "$tool" = fio-rbd-same ]; then
        res=$(CEPH_CONF=$same runfio "$rw" --ioengine=rbd --pool=rbd --rbdname="$img" --clientname=admin)
    elif [ "$tool" = vdiskd-mc ]; then
        res=$(runfio "$rw" --ioengine=nbd --uri="nbd+unix:///b?socket=$sock" --iodepth=16 --numjobs=2)
    else
        res=$(runfio "$rw" --ioengine=nbd --uri="nbd+unix:///b?socket=$sock")
    fi
    local scpu ocpu idle
    idle=$(idle_now | awk -v a="$i0" '{ split(a, x, " "); printf "%.0f", ($1 > x[1] ? ($2 - x[2]) * 100 / ($1 - x[1]) : 0) }')
    scpu=$(awk -v a="$(cpu_of "$srv")" -v b="$s0" -v t="$ticks" 'BEGIN { printf "%.2f", (a - b) / t }')
    ocpu=$(awk -v a="$(cpu_of "$osd")" -v b="$o0" -v t="$ticks" 'BEGIN { printf "%.2f", (a - b) / t }')
    local split=
    if [ -n "$sp" ]; then
        wait "$sp"
        split=$(awk -v i="${res% *}" -v w=$((RUNTIME - 2)) -v t="$ticks" \
            '{ printf "%s %.1f  ", $1, $2 / t * 1e6 / (i * w) } END { print "(us/IO)" }' "$dir/split")
    fi
    if [ -n "$srv" ]; then kill "$srv"; wait "$srv" 2>/dev/null || true; fi
    IOPS[$tool.$rw]=${res% *}
    printf '%-12s %-10s %8d IOPS   cpu: client %6.2fs  server %6.2fs  osd %6.2fs   %5.1f us cpu/IO (client+server)  idle %2d%%\n' \
        "$tool" "$rw" "${res% *}" "${res#* }" "$scpu" "$ocpu" \
        "$(awk -v c="${res#* }" -v s="$scpu" -v i="${res% *}" -v t="$RUNTIME" 'BEGIN { print (i > 0 ? (c + s) * 1e6 / (i * t) : 0) }')" \
        "$idle"
    [ -z "$split" ] || echo "    split: $split"
}

echo "# bench/rbd.sh: 4 KiB QD32, ${RUNTIME}s per case, $SIZE image, $(nproc) CPUs, $(ceph-osd --version | awk '{print $3}') memstore OSD${QUIET_CEPH:+ (QUIET_CEPH=$QUIET_CEPH)}"
RWS=${RWS:-randread randwrite}
TOOLS=${TOOLS:-vdiskd qemu-nbd fio-rbd}
for rw in $RWS; do
    for tool in $TOOLS; do one "$tool" "$rw"; done
done
for rw in $RWS; do
    v=${IOPS[vdiskd.$rw]:-0}; line=$rw
    for peer in qemu-nbd fio-rbd fio-rbd-same; do
        p=${IOPS[$peer.$rw]:-0}
        [ "$p" -gt 0 ] && [ "$v" -gt 0 ] && line+=$(awk -v v="$v" -v p="$p" -v n="$peer" 'BEGIN { printf "   vdiskd/%s %.2fx", n, v / p }')
    done
    m=${IOPS[vdiskd-mc.$rw]:-0}; f=${IOPS[fio-rbd.$rw]:-0}
    [ "$m" -gt 0 ] && [ "$f" -gt 0 ] && line+=$(awk -v v="$m" -v p="$f" 'BEGIN { printf "   vdiskd-mc/fio-rbd %.2fx", v / p }')
    echo "$line   (targets: >= 1.2 qemu-nbd, >= 0.8 fio-rbd)"
done
[ -n "${RBD_IMAGE:-}" ] || timeout 60 rbd -c "$conf" rm "rbd/$img" > /dev/null 2>&1 || true
