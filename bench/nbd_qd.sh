#!/usr/bin/env bash
# Where the NBD hop's cost shows: 4 KiB O_DIRECT randread through vdiskd
# (cache=none) and qemu-nbd (--cache=none --aio=io_uring), fio
# --ioengine=nbd, against fio io_uring --direct=1 on the same file, at queue
# depths 1, 32, 64 and 128, with the mean latency; and how many requests
# the disk itself holds (/sys/block/DEV/inflight sampled every 0.5 ms) at
# QD32. Uses bench/nbd_fio.sh's image.
#   RUNTIME=seconds per job (default 3), BENCH_DIR as bench/nbd_fio.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VDISKD=${VDISKD:-$PWD/build/bin/vdiskd}
RT=${RUNTIME:-3}
W=${BENCH_DIR:-$PWD/build/bench/nbd}
img=$W/img.raw
[ -s "$img" ] || { echo "run bench/nbd_fio.sh first (it creates $img)" >&2; exit 1; }
sock=$W/qd.sock qsock=$W/qdq.sock
rm -f "$sock" "$qsock"
"$VDISKD" --log-level=warning --nbd "unix:$sock" --export "file=$img,format=raw,cache=none" &
srv=$!
qemu-nbd -t -f raw --cache=none --aio=io_uring -e 8 -k "$qsock" "$img" &
qsrv=$!
trap 'kill $srv $qsrv 2>/dev/null; wait $srv $qsrv 2>/dev/null || true; rm -f "$sock" "$qsock"' EXIT
for _ in $(seq 200); do [ -S "$sock" ] && [ -S "$qsock" ] && break; sleep 0.05; done
dev=$(lsblk -no pkname "$(df --output=source "$img" | tail -1)" 2>/dev/null | head -1)
[ -n "$dev" ] || dev=$(basename "$(df --output=source "$img" | tail -1)")
infl=/sys/block/$dev/inflight

# inflight_hist SECONDS: share of samples with 0, 1-15, 16-31 and 32+ reads
# in flight, and the average queue size from /proc/diskstats (iostat's
# aqu-sz: weighted time in queue / elapsed time) over the same interval
inflight_hist() {
    [ -r "$infl" ] || { echo "(no $infl)"; return; }
    python3 - "$infl" "$1" "$dev" <<'PYEOF'
import sys, time
path, secs, dev = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def wq():
    for l in open('/proc/diskstats'):
        f = l.split()
        if f[2] == dev:
            return int(f[13]), int(f[3])
b = [0, 0, 0, 0]; n = 0; tot = 0
t0, (q0, r0) = time.time(), wq()
end = t0 + secs
while time.time() < end:
    r = int(open(path).read().split()[0])
    b[0 if r == 0 else 1 if r < 16 else 2 if r < 32 else 3] += 1; n += 1; tot += r
    time.sleep(0.0005)
q1, r1 = wq()
el = time.time() - t0
print('disk reads in flight: 0: %d%%, 1-15: %d%%, 16-31: %d%%, 32+: %d%%, mean %.1f; aqu-sz %.1f, disk reads/s %d'
      % tuple([100 * x // n for x in b] + [tot / n, (q1 - q0) / (el * 1000), (r1 - r0) / el]))
PYEOF
}

run() {   # QD ENGINE-ARGS...
    local qd=$1
    shift
    fio --name=qd --rw=randread --bs=4k --iodepth="$qd" --size=1G --runtime="$RT" --ramp_time=1 \
        --time_based --randrepeat=0 --norandommap --output-format=json "$@" 2>/dev/null |
        sed -n '/^{/,$p' | jq -r '.jobs[0].read | "\(.iops|floor) IOPS, mean latency \(.clat_ns.mean/1000|floor) us"'
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for qd in 1 32 64 128; do
    echo "QD$qd vdiskd:   $(run "$qd" --ioengine=nbd --uri="nbd+unix:///?socket=$sock")"
    echo "QD$qd qemu-nbd: $(run "$qd" --ioengine=nbd --uri="nbd+unix:///?socket=$qsock")"
    echo "QD$qd local:    $(run "$qd" --ioengine=io_uring --direct=1 --filename="$img")"
done
for who in vdiskd qemu-nbd local; do
    case $who in
    vdiskd) args=(--ioengine=nbd --uri="nbd+unix:///?socket=$sock") ;;
    qemu-nbd) args=(--ioengine=nbd --uri="nbd+unix:///?socket=$qsock") ;;
    *) args=(--ioengine=io_uring --direct=1 --filename="$img") ;;
    esac
    ( sleep 1.5; inflight_hist 1 ) > "$W/infl.$who" &
    h=$!
    run 32 "${args[@]}" > /dev/null
    wait $h
    echo "QD32 $who $(cat "$W/infl.$who")"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
