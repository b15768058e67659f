#!/usr/bin/env bash
# vhost-user-blk: vdiskd against qemu-storage-daemon behind the same
# front-end library and job (tests/helpers/vhost_io: no VM, one thread,
# interrupt-driven like libblkio's virtio-blk-vhost-user driver), and fio
# (io_uring) on the same file for the local baseline. Images: raw and
# qcow2 (fully allocated) on disk with O_DIRECT on every side, and raw on
# tmpfs (page cache, no O_DIRECT) where the CPU cost per request shows.
# Jobs: 4 KiB randread / randwrite at a total depth of 32 over 1 and 4
# queues (32, or 4 x 8), 1 MiB seqread at depth 8. Both daemons serve the
# image at once (qsd with locking=off) and each job runs RUNS times
# alternating vdisk, qsd and fio, so that a busy machine treats them alike;
# medians are printed: IOPS, the back-end's CPU time per request (µs,
# utime+stime of the daemon), vdisk/qsd and vdisk/fio ratios.
#   BENCH_SECONDS (3) per run, RUNS (3), BENCH_SIZE_MIB (1024) image size
#   IMAGES ("raw qcow2 tmpfs-raw") the images to run, ONLY (a regular
#   expression) the jobs to run, matched against "MODE NQq" (e.g. 'rand.* 1q')
#   VDISK_EXPORT_OPTS extra vdiskd export options (e.g. ",submit-batch=0")
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-3}
RUNS=${RUNS:-3}
SIZE=${BENCH_SIZE_MIB:-1024}
IMAGES=${IMAGES:-raw qcow2 tmpfs-raw}
ONLY=${ONLY:-.}
B=${VDISK_BUILD:-build}
VDISKD=$B/bin/vdiskd
IO=$B/tests/helpers/vhost_io
make -s "BUILD=$B" "$VDISKD" "$IO" > /dev/null
command -v qemu-storage-daemon > /dev/null || { echo "qemu-storage-daemon missing (qemu-system-common)"; exit 1; }
command -v fio > /dev/null || { echo "fio missing"; exit 1; }
dir=$PWD/build/bench/vhost
mkdir -p "$dir"
shm=/dev/shm/vdisk-bench-$$.raw
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$shm"; }
trap cleanup EXIT

if [ ! -f "$dir/disk.raw" ] || [ "$(stat -c %s "$dir/disk.raw")" != $((SIZE << 20)) ]; then
    head -c $((SIZE << 20)) /dev/urandom > "$dir/disk.raw"
    rm -f "$dir/disk.qcow2"
fi
[[ " $IMAGES " != *" qcow2 "* ]] || [ -f "$dir/disk.qcow2" ] || qemu-img convert -O qcow2 "$dir/disk.raw" "$dir/disk.qcow2"
[[ " $IMAGES " != *" tmpfs-raw "* ]] || head -c $(( (SIZE < 512 ? SIZE : 512) << 20)) "$dir/disk.raw" > "$shm"
tick=$(getconf CLK_TCK)

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

# start_backend vdisk|qsd IMAGE FORMAT DIRECT(on|off): sets BPID, BSOCK
start_backend() {
    local kind=$1 img=$2 fmt=$3 direct=$4
    BSOCK=$dir/$kind.sock
    rm -f "$BSOCK"
    if [ "$kind" = vdisk ]; then
        local cache=writeback; [ "$direct" = on ] && cache=none
        "$VDISKD" --nbd "unix:$dir/nbd.sock" \
            --export "type=vhost-user-blk,name=b,file=$img,format=$fmt,cache=$cache,aio=io_uring,socket=$BSOCK,num-queues=4${VDISK_EXPORT_OPTS:-}" \
            2> "$dir/vdiskd.log" &
    else
        qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$img,cache.direct=$direct,aio=io_uring,locking=off" \
            --blockdev "driver=$fmt,node-name=fmt,file=f" \
            --export "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path=$BSOCK,writable=on,num-queues=4" \
            2> "$dir/qsd.log" &
    fi
    BPID=$!
    pids+=("$BPID")
    wait_sock "$BSOCK"
}

# job PID SOCKET MODE QUEUES QD BS -> "IOPS CPU_US_PER_REQ"
job() {
    local pid=$1 sock=$2 c0 c1 out
    shift 2
    c0=$(cpu_ticks "$pid")
    out=$("$IO" --mode "$1" --queues "$2" --qd "$3" --bs "$4" --runtime "$SECS" --json "$sock")
    c1=$(cpu_ticks "$pid")
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); ops=max(j["ops"],1); print("%.0f %.2f" % (j["iops"], (int(sys.argv[2]) / int(sys.argv[3])) * 1e6 / ops))' \
        "$out" "$((c1 - c0))" "$tick"
}

# fio on the file: MODE QUEUES(jobs) QD BS DIRECT -> IOPS
fio_job() {
    local rw=$1 jobs=$2 qd=$3 bs=$4 direct=$5 img=$6
    fio --name=j --filename="$img" --direct="$direct" --ioengine=io_uring --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs="$jobs" --group_reporting --runtime="$SECS" --time_based \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.0f" % (j["read"]["iops"] + j["write"]["iops"]))'
}

JOBS=("randread 1 32 4K" "randread 4 8 4K" "randwrite 1 32 4K" "randwrite 4 8 4K" "seqread 1 8 1M")
FIO=("randread" "randread" "randwrite" "randwrite" "read")

median() { sort -n | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

run_image() {   # label image format direct with_fio
    local label=$1 img=$2 fmt=$3 direct=$4 with_fio=$5 vp vs qp qs
    start_backend vdisk "$img" "$fmt" "$direct"; vp=$BPID; vs=$BSOCK
    start_backend qsd "$img" "$fmt" "$direct"; qp=$BPID; qs=$BSOCK
    for i in "${!JOBS[@]}"; do
        local j=${JOBS[$i]} V=() Q=() F=()
        read -r mode nq qd bs <<<"$j"
        [[ "$mode ${nq}q" =~ $ONLY ]] || continue
        for ((r = 0; r < RUNS; r++)); do
            V+=("$(job "$vp" "$vs" $j)")
            Q+=("$(job "$qp" "$qs" $j)")
            [ "$with_fio" = yes ] && F+=("$(fio_job "${FIO[$i]}" "$nq" "$qd" "$bs" "$([ "$direct" = on ] && echo 1 || echo 0)" "$img")")
        done
        local vi vc qi qc f=- fr=-
        vi=$(printf '%s\n' "${V[@]}" | awk '{print $1}' | median); vc=$(printf '%s\n' "${V[@]}" | awk '{print $2}' | median)
        qi=$(printf '%s\n' "${Q[@]}" | awk '{print $1}' | median); qc=$(printf '%s\n' "${Q[@]}" | awk '{print $2}' | median)
        if [ "$with_fio" = yes ]; then f=$(printf '%s\n' "${F[@]}" | median); fr=$(ratio "$vi" "$f"); fi
        printf '%-10s %-9s %dq x qd%-2d %-3s | vdisk %8d IOPS %6.2f us/req | qsd %8d IOPS %6.2f us/req | vdisk/qsd %5.2f | fio %8s | vdisk/fio %s\n' \
            "$label" "$mode" "$nq" "$qd" "$bs" "$vi" "$vc" "$qi" "$qc" "$(ratio "$vi" "$qi")" "$f" "$fr"
    done
    kill "$vp" "$qp" 2>/dev/null || true
    wait "$vp" "$qp" 2>/dev/null || true
}

echo "# vhost-user-blk, median of $RUNS runs of ${SECS}s per job, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for im in $IMAGES; do
    case $im in
    raw) run_image raw "$dir/disk.raw" raw on yes ;;
    qcow2) run_image qcow2 "$dir/disk.qcow2" qcow2 on no ;;
    tmpfs-raw) run_image tmpfs-raw "$shm" raw off yes ;;
    *) echo "unknown image $im (raw, qcow2, tmpfs-raw)"; exit 1 ;;
    esac
done
echo "# load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
