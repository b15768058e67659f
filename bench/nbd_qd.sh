#!/usr/bin/env bash
# Where the NBD hop's cost shows: 4 KiB O_DIRECT randread through vdiskd
# (cache=none, fio --ioengine=nbd) against fio io_uring --direct=1 on the
# same file, at queue depths 1, 32, 64 and 128, with the mean latency; and
# how many requests the disk itself holds (/sys/block/DEV/inflight sampled
# every 0.5 ms) at QD32. Uses bench/nbd_fio.sh's image.
#   RUNTIME=seconds per job (default 3), BENCH_DIR as bench/nbd_fio.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VDISKD=${VDISKD:-$PWD/build/bin/vdiskd}
RT=${RUNTIME:-3}
W=${BENCH_DIR:-$PWD/build/bench/nbd}
img=$W/img.raw
[ -s "$img" ] || { echo "run bench/nbd_fio.sh first (it creates $img)" >&2; exit 1; }
sock=$W/qd.sock
rm -f "$sock"
"$VDISKD" --log-level=warning --nbd "unix:$sock" --export "file=$img,format=raw,cache=none" &
srv=$!
trap 'kill $srv 2>/dev/null; wait $srv 2>/dev/null || true; rm -f "$sock"' EXIT
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
dev=$(lsblk -no pkname "$(df --output=source "$img" | tail -1)" 2>/dev/null | head -1)
[ -n "$dev" ] || dev=$(basename "$(df --output=source "$img" | tail -1)")
infl=/sys/block/$dev/inflight

# inflight_hist SECONDS: share of samples with 0, 1-15, 16-31 and 32+ reads in flight
inflight_hist() {
    [ -r "$infl" ] || { echo "(no $infl)"; return; }
    python3 - "$infl" "$1" <<'PYEOF'
import sys, time
path, secs = sys.argv[1], float(sys.argv[2])
b = [0, 0, 0, 0]; n = 0; tot = 0
end = time.time() + secs
while time.time() < end:
    r = int(open(path).read().split()[0])
    b[0 if r == 0 else 1 if r < 16 else 2 if r < 32 else 3] += 1; n += 1; tot += r
    time.sleep(0.0005)
print('disk reads in flight: 0: %d%%, 1-15: %d%%, 16-31: %d%%, 32+: %d%%, mean %.1f'
      % tuple([100 * x // n for x in b] + [tot / n]))
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
    echo "QD$qd vdiskd: $(run "$qd" --ioengine=nbd --uri="nbd+unix:///?socket=$sock")"
    echo "QD$qd local:  $(run "$qd" --ioengine=io_uring --direct=1 --filename="$img")"
done
for who in vdiskd local; do
    if [ $who = vdiskd ]; then args=(--ioengine=nbd --uri="nbd+unix:///?socket=$sock")
    else args=(--ioengine=io_uring --direct=1 --filename="$img"); fi
    ( sleep 1.5; inflight_hist 1 ) > "$W/infl.$who" &
    h=$!
    run 32 "${args[@]}" > /dev/null
    wait $h
    echo "QD32 $who $(cat "$W/infl.$who")"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
