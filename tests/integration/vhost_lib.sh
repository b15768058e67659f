#!/usr/bin/env bash
# vhost-user-blk through the front-end library (tests/helpers/vhost_io):
# against vdisk's back-end and against qemu-storage-daemon, with data
# verified in the guest memory and the image checked with qemu-img compare
# afterwards; multi-queue, indirect or not, EVENT_IDX or not, two memory
# regions; a front-end that dies mid-I/O leaves the export usable.
source "$(dirname "$0")/../lib.sh"
H=$VDISK_BUILD/tests/helpers
IO=$H/vhost_io

# start_vdisk IMAGE SOCKET [options]: the vdisk back-end in the background
start_vdisk() {
    local img=$1 sock=$2; shift 2
    rm -f "$sock"
    "$H/vhost_serve" --format raw --serial vdisk-test "$@" --pidfile "$sock.pid" "$img" "$sock" 2>> "$T/serve.log" &
    on_exit "kill $! 2>/dev/null; wait $! 2>/dev/null"
    for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
    return 1
}
stop_pid() {
    local pid; pid=$(cat "$1" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
}

truncate -s 64M "$T/a.raw"
start_vdisk "$T/a.raw" "$T/a.sock" --num-queues 4
check "vdisk: all request types, 2 queues, data verified" \
    "$IO" --queues 2 --qd 8 --bs 64K --seed 11 --expect "$T/a.expect" "$T/a.sock"
check "vdisk: serial through GET_ID" bash -c "'$IO' --queues 1 --qd 1 --bs 4K --size 4M --seed 11 '$T/a.sock' | grep -qx 'serial: vdisk-test'"
check "vdisk: 4 queues, no indirect descriptors, no EVENT_IDX" \
    "$IO" --mode fill --queues 4 --qd 16 --bs 4K --size 16M --seed 12 --no-indirect --no-event-idx "$T/a.sock"
check "vdisk: verify what 4 queues wrote, buffers in a second memory region" \
    "$IO" --mode verify --queues 3 --qd 32 --bs 128K --size 16M --seed 12 --split-memory "$T/a.sock"
check "vdisk: small queue, deep chains" \
    "$IO" --mode verify --queues 1 --qd 40 --bs 1M --size 16M --seed 12 --no-indirect --queue-size 128 "$T/a.sock"

# a front-end killed with requests in flight: the export keeps serving
"$IO" --mode fill --queues 2 --qd 32 --bs 4K --seed 13 "$T/a.sock" > /dev/null 2>&1 &
io=$!; sleep 0.3; kill -9 $io 2>/dev/null; wait $io 2>/dev/null
check "vdisk: usable after a front-end died mid-I/O" \
    "$IO" --queues 2 --qd 8 --bs 64K --seed 14 --expect "$T/a.expect" "$T/a.sock"
stop_pid "$T/a.sock.pid"
check "vdisk: image content as expected (qemu-img compare)" qemu-img compare -f raw -F raw "$T/a.expect" "$T/a.raw"
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve.log"; then
    fail "vdisk back-end: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve.log")"
else ok "vdisk back-end: no sanitizer report"; fi

# read-only export: writes fail, reads work
truncate -s 16M "$T/ro.raw"
start_vdisk "$T/ro.raw" "$T/ro.sock" --readonly
check "vdisk: read-only export reads" "$IO" --mode seqread --runtime 0.2 --queues 1 --qd 4 --bs 4K "$T/ro.sock"
check_fails "vdisk: read-only export refuses writes" "$IO" --mode fill --queues 1 --qd 4 --bs 4K "$T/ro.sock"
stop_pid "$T/ro.sock.pid"

# the same front-end against qemu-storage-daemon
if command -v qemu-storage-daemon > /dev/null; then
    truncate -s 64M "$T/q.raw"
    qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$T/q.raw",discard=unmap \
        --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="$T/q.sock",writable=on,num-queues=2 \
        --pidfile "$T/q.pid" 2> "$T/qsd.log" &
    on_exit "kill $! 2>/dev/null"
    for _ in $(seq 100); do [ -S "$T/q.sock" ] && break; sleep 0.05; done
    check "qemu-storage-daemon: all request types, 2 queues, data verified" \
        "$IO" --queues 2 --qd 8 --bs 64K --seed 21 --expect "$T/q.expect" "$T/q.sock"
    check "qemu-storage-daemon: no indirect, two memory regions" \
        "$IO" --mode verify --queues 2 --qd 16 --bs 16K --seed 21 --size 16M --no-indirect --split-memory "$T/q.sock"
    stop_pid "$T/q.pid"
    check "qemu-storage-daemon: image content as expected" qemu-img compare -f raw -F raw "$T/q.expect" "$T/q.raw"
else
    fail "qemu-storage-daemon is installed" "install qemu-system-common"
fi
