#!/usr/bin/env bash
# vhost-user-blk through the front-end library (tests/helpers/vhost_io):
# against vdiskd --export type=vhost-user-blk and against qemu-storage-daemon, with data
# verified in the guest memory and the image checked with qemu-img compare
# afterwards; multi-queue, indirect or not, EVENT_IDX or not, two memory
# regions; a front-end that dies mid-I/O leaves the export usable.
source "$(dirname "$0")/../lib.sh"
H=$VDISK_BUILD/tests/helpers
IO=$H/vhost_io

# start_vdisk IMAGE SOCKET [export options]: vdiskd serving IMAGE over
# vhost-user-blk, in the background
start_vdisk() {
    local img=$1 sock=$2 opts=${3:+,$3}
    rm -f "$sock"
    "$VDISKD" --nbd "unix:$sock.nbd" --control "$sock.ctl" --pidfile "$sock.pid" \
        --export "type=vhost-user-blk,name=vdisk-test,file=$img,format=raw,socket=$sock$opts" 2>> "$T/serve.log" &
    on_exit "kill $! 2>/dev/null; wait $! 2>/dev/null"
    for _ in $(seq 200); do [ -S "$sock" ] && [ -f "$sock.pid" ] && return 0; sleep 0.05; done
    return 1
}
# ctl SOCKET COMMAND ARGS-JSON: one control command; prints the reply
ctl() {
    python3 - "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
f.write(json.dumps({"execute": sys.argv[2], "arguments": json.loads(sys.argv[3])}) + "\n"); f.flush()
r = f.readline(); print(r.strip()); sys.exit(0 if '"return"' in r else 1)
PY
}
stop_pid() {
    local pid; pid=$(cat "$1" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
}

truncate -s 64M "$T/a.raw"
start_vdisk "$T/a.raw" "$T/a.sock" num-queues=4
check "vdisk: all request types, 2 queues, data verified" \
    "$IO" --queues 2 --qd 8 --bs 64K --seed 11 --expect "$T/a.expect" "$T/a.sock"
check "vdisk: serial through GET_ID" bash -c "'$IO' --queues 1 --qd 1 --bs 4K --size 4M --seed 11 '$T/a.sock' | grep -qx 'serial: vdisk-test'"
check "vdisk: 4 queues, no indirect descriptors, no EVENT_IDX" \
    "$IO" --mode fill --queues 4 --qd 16 --bs 4K --size 16M --seed 12 --no-indirect --no-event-idx "$T/a.sock"
check "vdisk: verify what 4 queues wrote, buffers in a second memory region" \
    "$IO" --mode verify --queues 3 --qd 32 --bs 128K --size 16M --seed 12 --split-memory "$T/a.sock"
check "vdisk: small queue, deep chains" \
    "$IO" --mode verify --queues 1 --qd 40 --bs 1M --size 16M --seed 12 --no-indirect --queue-size 128 "$T/a.sock"

# dirty logging (live migration): exactly the pages the back-end wrote are marked
check "vdisk: dirty log marks read buffers, status bytes, used rings, nothing else" \
    "$IO" --mode dirty-log --queues 2 --qd 8 --bs 16K --size 8M --seed 16 "$T/a.sock"
check "vdisk: dirty log with two memory regions, no indirect descriptors" \
    "$IO" --mode dirty-log --queues 1 --qd 4 --bs 4K --size 1M --seed 16 --split-memory --no-indirect "$T/a.sock"

# a front-end killed with requests in flight: the export keeps serving
"$IO" --mode fill --queues 2 --qd 32 --bs 4K --seed 13 "$T/a.sock" > /dev/null 2>&1 &
io=$!; sleep 0.3; kill -9 $io 2>/dev/null; wait $io 2>/dev/null
check "vdisk: usable after a front-end died mid-I/O" \
    "$IO" --queues 2 --qd 8 --bs 64K --seed 14 --expect "$T/a.expect" "$T/a.sock"
# exports added and removed on the control socket: export-del drops a connected front-end and removes the socket
truncate -s 16M "$T/c.raw"
check "export-add type=vhost-user-blk on the control socket" ctl "$T/a.sock.ctl" export-add \
    "{\"name\": \"c\", \"type\": \"vhost-user-blk\", \"file\": \"$T/c.raw\", \"format\": \"raw\", \"socket\": \"$T/c.sock\", \"num-queues\": \"2\"}"
check "the added export serves" "$IO" --mode fill --queues 2 --qd 8 --bs 64K --seed 15 "$T/c.sock"
check_fails "export-add with an unknown vhost option fails" ctl "$T/a.sock.ctl" export-add \
    "{\"name\": \"d\", \"type\": \"vhost-user-blk\", \"file\": \"$T/c.raw\", \"socket\": \"$T/d.sock\", \"queues\": \"2\"}"
check_fails "export-add without socket= fails" ctl "$T/a.sock.ctl" export-add \
    "{\"name\": \"e\", \"type\": \"vhost-user-blk\", \"file\": \"$T/c.raw\", \"format\": \"raw\"}"
"$IO" --mode randread --runtime 30 --queues 2 --qd 8 --bs 4K "$T/c.sock" > "$T/del.out" 2>&1 &
rd=$!
sleep 0.5
check "export-del while a front-end is connected" ctl "$T/a.sock.ctl" export-del '{"name": "c"}'
wait $rd; rc=$?
if [ $rc -ne 0 ] && grep -q 'went away' "$T/del.out"; then ok "the front-end was dropped"; else fail "the front-end was dropped" "rc $rc: $(tail -2 "$T/del.out")"; fi
if [ ! -e "$T/c.sock" ]; then ok "the export's socket is gone"; else fail "the export's socket is gone"; fi

# online resize: the front-end hears of it on the back-end channel
"$IO" --mode resize-wait --runtime 20 "$T/a.sock" > "$T/resize.out" 2>&1 &
rz=$!
sleep 0.5
check "vhost-user-blk-resize on the control socket" ctl "$T/a.sock.ctl" vhost-user-blk-resize '{"name": "vdisk-test", "size": 100663296}'
wait $rz; rc=$?
if [ $rc -eq 0 ] && [ "$(grep -c '^capacity' "$T/resize.out")" = 2 ] && grep -qx 'capacity 100663296' "$T/resize.out"; then
    ok "config change reaches the front-end; new capacity readable"
else fail "config change reaches the front-end; new capacity readable" "$(tr '\n' ' ' < "$T/resize.out")"; fi
check_fails "vhost-user-blk-resize of an unknown export fails" ctl "$T/a.sock.ctl" vhost-user-blk-resize '{"name": "nope", "size": 1048576}'
truncate -s 64M "$T/a.raw"     # back to the size the expected image has
stop_pid "$T/a.sock.pid"
check "vdisk: image content as expected (qemu-img compare)" qemu-img compare -f raw -F raw "$T/a.expect" "$T/a.raw"
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve.log"; then
    fail "vdisk back-end: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve.log")"
else ok "vdisk back-end: no sanitizer report"; fi

# read-only export: writes fail, reads work
truncate -s 16M "$T/ro.raw"
start_vdisk "$T/ro.raw" "$T/ro.sock" readonly=on
check "vdisk: read-only export reads" "$IO" --mode seqread --runtime 0.2 --queues 1 --qd 4 --bs 4K "$T/ro.sock"
check_fails "vdisk: read-only export refuses writes" "$IO" --mode fill --queues 1 --qd 4 --bs 4K "$T/ro.sock"
stop_pid "$T/ro.sock.pid"

# submit-batch: requests pushed to the kernel every N taken (1: each one;
# 0: one submission per wake-up); deep queues so that a wake-up takes many
truncate -s 16M "$T/sb.raw"
for sb in 1 0; do
    start_vdisk "$T/sb.raw" "$T/sb$sb.sock" "num-queues=2,submit-batch=$sb"
    check "vdisk submit-batch=$sb: fill over 2 queues at depth 64" \
        "$IO" --mode fill --queues 2 --qd 64 --bs 4K --seed $((30 + sb)) "$T/sb$sb.sock"
    check "vdisk submit-batch=$sb: verify over 2 queues at depth 64" \
        "$IO" --mode verify --queues 2 --qd 64 --bs 8K --seed $((30 + sb)) "$T/sb$sb.sock"
    check "vdisk submit-batch=$sb: timed random writes" \
        "$IO" --mode randwrite --runtime 0.3 --queues 1 --qd 32 --bs 4K "$T/sb$sb.sock"
    stop_pid "$T/sb$sb.sock.pid"
done
check_fails "vdiskd refuses submit-batch=5000" "$VDISKD" --nbd "unix:$T/sbx.nbd" \
    --export "type=vhost-user-blk,name=x,file=$T/sb.raw,format=raw,socket=$T/sbx.sock,submit-batch=5000"

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
    check "qemu-storage-daemon: dirty log marks the same pages" \
        "$IO" --mode dirty-log --queues 2 --qd 8 --bs 16K --size 8M --seed 21 "$T/q.sock"
    check "qemu-storage-daemon: no indirect, two memory regions" \
        "$IO" --mode verify --queues 2 --qd 16 --bs 16K --seed 21 --size 16M --no-indirect --split-memory "$T/q.sock"
    stop_pid "$T/q.pid"
    check "qemu-storage-daemon: image content as expected" qemu-img compare -f raw -F raw "$T/q.expect" "$T/q.raw"
else
    fail "qemu-storage-daemon is installed" "install qemu-system-common"
fi
