#!/usr/bin/env bash
# nbdkit-vdisk-plugin vs its peers, one run, the same data, the same fio
# jobs through fio's NBD engine (libnbd, Unix socket, one connection):
#   raw:   nbdkit + vdisk plugin (format=raw)  vs  nbdkit file plugin
#   qcow2: nbdkit + vdisk plugin               vs  qemu-nbd (cache=writeback, aio=io_uring)
# Jobs: 4 KiB randread QD32, 4 KiB randwrite QD32, 1 MiB sequential read QD8.
# Prints IOPS per server and the ratio plugin / peer (above 1: the plugin is faster).
#   RUNTIME=seconds per job (default 8), SIZE_MB (default 512), BENCH_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PLUGIN=${PLUGIN:-$PWD/build/lib/nbdkit-vdisk-plugin.so}
RT=${RUNTIME:-8}
MB=${SIZE_MB:-512}
W=${BENCH_DIR:-$PWD/build/bench/plugin}
mkdir -p "$W"
img=$W/img.raw
qimg=$W/img.qcow2
if [ ! -s "$img" ] || [ "$(stat -c %s "$img")" -ne $((MB << 20)) ]; then
    openssl enc -aes-128-ctr -pass pass:pluginbench -nosalt -pbkdf2 \
        < <(head -c $((MB << 20)) /dev/zero) > "$img" 2>/dev/null
    rm -f "$qimg"
fi
[ -s "$qimg" ] || qemu-img convert -f raw -O qcow2 "$img" "$qimg"
sock=$W/nbd.sock
pidf=$W/srv.pid
stop() {
    local pid; pid=$(cat "$pidf" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    rm -f "$pidf" "$sock"
}
trap stop EXIT
start() {   # start KIND
    stop
    case $1 in
        plugin-raw)   nbdkit -U "$sock" -P "$pidf" "$PLUGIN" format=raw "$img" ;;
        file)         nbdkit -U "$sock" -P "$pidf" file "$img" ;;
        plugin-qcow2) nbdkit -U "$sock" -P "$pidf" "$PLUGIN" "$qimg" ;;
        qemu-nbd)     qemu-nbd -k "$sock" -f qcow2 --cache=writeback --aio=io_uring -e 8 -t \
                          --fork --pid-file "$pidf" "$qimg" ;;
    esac
    for _ in $(seq 100); do [ -S "$sock" ] && return; sleep 0.05; done
}
job() {     # job NAME RW BS QD -> prints IOPS
    fio --name="$1" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$2" --bs="$3" \
        --iodepth="$4" --runtime="$RT" --time_based --size=$((MB << 20)) \
        --output-format=json --output="$W/fio.json" >/dev/null 2>&1
    jq '.jobs[0] | (.read.iops + .write.iops) | floor' "$W/fio.json"
}
declare -A R
for srv in ${SERVERS:-plugin-raw file plugin-qcow2 qemu-nbd}; do
    start $srv
    R[$srv,randread]=$(job rr randread 4k 32)
    R[$srv,randwrite]=$(job rw randwrite 4k 32)
    R[$srv,seqread]=$(job sr read 1m 8)
    stop
    printf '%-13s randread %8d IOPS  randwrite %8d IOPS  seqread 1M %6d IOPS\n' $srv \
        "${R[$srv,randread]}" "${R[$srv,randwrite]}" "${R[$srv,seqread]}"
done
for pair in "plugin-raw file" "plugin-qcow2 qemu-nbd"; do
    set -- $pair
    printf '%-24s' "$1/$2"
    for j in randread randwrite seqread; do
        printf '  %s %.2fx' $j "$(echo "${R[$1,$j]} / ${R[$2,$j]}" | bc -l)"
    done
    echo
done
