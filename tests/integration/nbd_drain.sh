#!/usr/bin/env bash
# Draining on export removal and on shutdown: every request a client sent
# before export-del / SIGTERM gets its reply, the data of acknowledged
# writes is in the image, and a client that never reads its replies is cut
# off after --drain-timeout instead of holding up the removal or the exit.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

S=$T/nbd.sock
C=$T/ctl.sock

# burst.py URI PAUSE_FILE: sends 32 x 64 KiB writes, 150 x 256 KiB reads and
# a flush (more than the 128 requests the daemon holds per connection, so
# some wait in the socket) without reading a single reply; creates
# PAUSE_FILE.sent, waits until PAUSE_FILE exists, then reads every reply.
# Prints "replies N errors E" and exits 0 when every request succeeded.
cat > "$T/burst.py" <<'PYEOF'
import nbd, os, select, sys, time
uri, pause = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
bufs, cookies = [], []
for i in range(32):
    b = nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536)
    bufs.append(b)
    cookies.append(h.aio_pwrite(b, (i * 2 + 1) << 16))
for i in range(150):
    b = nbd.Buffer(262144)
    bufs.append(b)
    cookies.append(h.aio_pread(b, (i % 64) << 18))
cookies.append(h.aio_flush())
# Push every request out, reading nothing.
fd = h.aio_get_fd()
deadline = time.time() + 30
while h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
    if time.time() > deadline:
        sys.exit('could not send every request')
    select.select([], [fd], [], 1)
    h.aio_notify_write()
open(pause + '.sent', 'w').close()
while not os.path.exists(pause):
    time.sleep(0.02)
# Now take the replies.
while h.aio_in_flight() > 0:
    try:
        h.poll(5000)
    except nbd.Error:
        break
errors = 0
for c in cookies:
    try:
        if not h.aio_command_completed(c):
            errors += 1
    except nbd.Error as e:
        errors += 1
        print('# request failed: %s' % e)
print('replies %d errors %d' % (len(cookies) - errors, errors))
sys.exit(1 if errors else 0)
PYEOF

# The 32 writes (byte i+1 at (2i+1) * 64 KiB) are in IMAGE_AS_RAW.
cat > "$T/verify.py" <<'PYEOF'
import sys
d = open(sys.argv[1], 'rb').read()
for i in range(32):
    off = (i * 2 + 1) << 16
    if d[off:off + 65536] != bytes([i + 1]) * 65536:
        sys.exit('write %d at %d is not in the image' % (i, off))
PYEOF

wait_file() {   # FILE: wait (10 s at most) for FILE to appear
    local i
    for i in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done
    return 1
}

# run_burst NAME URI ACTION...: start the burst, wait until it has sent
# everything, run ACTION in the background, give the daemon time to finish
# the disk work (the replies pile up unsent), then let the client read.
run_burst() {
    local name=$1 uri=$2; shift 2
    rm -f "$T/$name.go" "$T/$name.go.sent"
    $PY "$T/burst.py" "$uri" "$T/$name.go" > "$T/$name.out" 2>&1 &
    local bp=$!
    if ! wait_file "$T/$name.go.sent"; then
        fail "$name: the client sent its burst" "$(cat "$T/$name.out")"
        kill $bp 2>/dev/null
        return 1
    fi
    "$@" > "$T/$name.action" 2>&1 &
    action_pid=$!
    sleep 0.5
    touch "$T/$name.go"
    wait $bp; burst_rc=$?
}

# Data where the reads land, so that replies are large (zeros would go out
# as 32-byte hole chunks and all fit in the socket buffer).
rand_file "$T/seed.raw" 16 seedd
truncate -s 64M "$T/seed.raw"
qemu-img convert -f raw -O qcow2 "$T/seed.raw" "$T/a.qcow2"
truncate -s 64M "$T/b.raw"

# ---- export-del while 183 requests are in flight (qcow2) ----
start_vdiskd d --nbd "unix:$S" --control "$C" \
    --export "name=a,file=$T/a.qcow2,format=qcow2" --export "name=b,file=$T/b.raw,format=raw" || exit 1
run_burst del "nbd+unix:///a?socket=$S" "$VDISK" ctl "$C" export-del name=a
wait $action_pid; del_rc=$?
if [ $burst_rc -eq 0 ]; then ok "export-del: every request sent before it got a successful reply ($(cat "$T/del.out"))"
else fail "export-del: every request sent before it got a successful reply" "$(tail -3 "$T/del.out" | tr '\n' ' ')"; fi
if [ $del_rc -eq 0 ]; then ok "export-del returns after the drain"; else fail "export-del returns after the drain" "$(cat "$T/del.action")"; fi
qemu-img convert -f qcow2 -O raw "$T/a.qcow2" "$T/a.out.raw"
check "export-del: acknowledged writes are in the qcow2 image" $PY "$T/verify.py" "$T/a.out.raw"
check "export-del: the image is consistent" qemu-img check -f qcow2 "$T/a.qcow2"
check "the other export still serves" nbdinfo --size "nbd+unix:///b?socket=$S"

# ---- export-del with a client that never reads: bounded by --drain-timeout ----
stop_vdiskd d
start_vdiskd e --nbd "unix:$S" --control "$C" --drain-timeout 2 \
    --export "name=a,file=$T/a.qcow2,format=qcow2" --export "name=b,file=$T/b.raw,format=raw" || exit 1
rm -f "$T/never.go" "$T/never.go.sent"
$PY "$T/burst.py" "nbd+unix:///a?socket=$S" "$T/never.go" > /dev/null 2>&1 &
never=$!
on_exit "kill $never 2>/dev/null"
wait_file "$T/never.go.sent"
t0=$(date +%s%N)
timeout 60 "$VDISK" ctl "$C" export-del name=a > "$T/never.action" 2>&1; rc=$?
ms=$((($(date +%s%N) - t0) / 1000000))
if [ $rc -eq 0 ]; then ok "export-del with a client that never reads returns ($ms ms, --drain-timeout 2)"
else fail "export-del with a client that never reads returns" "rc $rc $(cat "$T/never.action")"; fi
check "the cut-off is logged" grep -q "unsent after 2 s of draining" "$T/e.log"
check "the daemon still serves after the cut-off" nbdinfo --size "nbd+unix:///b?socket=$S"
kill $never 2>/dev/null; wait $never 2>/dev/null
stop_vdiskd e

# ---- SIGTERM while 183 requests are in flight (raw) ----
cp "$T/seed.raw" "$T/c.raw"
start_vdiskd f --nbd "unix:$S" --export "name=c,file=$T/c.raw,format=raw" || exit 1
run_burst term "nbd+unix:///c?socket=$S" kill -TERM "$f_pid"
wait "$f_pid"; rc=$?
if [ $burst_rc -eq 0 ]; then ok "SIGTERM: every request sent before it got a successful reply ($(cat "$T/term.out"))"
else fail "SIGTERM: every request sent before it got a successful reply" "$(tail -3 "$T/term.out" | tr '\n' ' ')"; fi
if [ $rc -eq 0 ] && sanitizer_clean "$T/f.log"; then ok "SIGTERM after the drain: clean exit"; else fail "SIGTERM after the drain: clean exit" "rc $rc"; fi
check "SIGTERM: acknowledged writes are in the image" $PY "$T/verify.py" "$T/c.raw"

# ---- SIGTERM with a client that never reads ----
start_vdiskd g --nbd "unix:$S" --drain-timeout 2 --export "name=c,file=$T/c.raw,format=raw" || exit 1
rm -f "$T/never2.go" "$T/never2.go.sent"
$PY "$T/burst.py" "nbd+unix:///c?socket=$S" "$T/never2.go" > /dev/null 2>&1 &
never=$!
on_exit "kill $never 2>/dev/null"
wait_file "$T/never2.go.sent"
t0=$(date +%s%N)
kill -TERM "$g_pid"
# Bounded: the drain timeout, then the flush and close.
for i in $(seq 600); do kill -0 "$g_pid" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$g_pid" 2>/dev/null
wait "$g_pid"; rc=$?
ms=$((($(date +%s%N) - t0) / 1000000))
if [ $rc -eq 0 ] && sanitizer_clean "$T/g.log"; then ok "SIGTERM with a client that never reads: clean exit ($ms ms, --drain-timeout 2)"
else fail "SIGTERM with a client that never reads: clean exit" "rc $rc"; fi
check "the cut-off is logged" grep -q "unsent after 2 s of draining" "$T/g.log"
kill $never 2>/dev/null; wait $never 2>/dev/null
# ---- SIGTERM while a client keeps pipelining requests as fast as it can ----
# The drain serves what the socket held when it began, not whatever the
# client sends afterwards: it ends by itself, well inside --drain-timeout,
# and every reply the client gets is whole.
cat > "$T/flood.py" <<'PYEOF'
import socket, struct, sys, threading, os
sock, name, started = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
def recvn(s, n):
    b = bytearray()
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            return bytes(b)
        b += x
    return bytes(b)
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
assert len(recvn(s, 18)) == 18
s.sendall(struct.pack('>I', 3))
s.sendall(struct.pack('>QII', 0x49484156454f5054, 7, 6 + len(name)) +
          struct.pack('>I', len(name)) + name + struct.pack('>H', 0))
while True:
    magic, o, t, n = struct.unpack('>QIII', recvn(s, 20))
    recvn(s, n)
    if t == 1:
        break
stop = False
def send():
    reqs = b''.join(struct.pack('>IHHQQI', 0x25609513, 0, 0, i, (i % 1024) << 12, 4096) for i in range(64))
    try:
        while not stop:
            s.sendall(reqs)
    except OSError:
        pass
threading.Thread(target=send, daemon=True).start()
got = 0
while True:
    h = recvn(s, 16)
    if not h:
        break
    if len(h) < 16:
        sys.exit('a reply header cut short after %d replies' % got)
    magic, err, cookie = struct.unpack('>IIQ', h)
    if magic != 0x67446698 or err:
        sys.exit('bad reply %x err %d after %d replies' % (magic, err, got))
    if len(recvn(s, 4096)) < 4096:
        sys.exit('a read reply cut short after %d replies' % got)
    got += 1
    if got == 2000:
        open(started, 'w').close()
stop = True
print('%d whole replies, then a clean close' % got)
PYEOF
start_vdiskd h --nbd "unix:$S" --drain-timeout 30 --export "name=c,file=$T/c.raw,format=raw" || exit 1
rm -f "$T/flood.started"
$PY "$T/flood.py" "$S" c "$T/flood.started" > "$T/flood.out" 2>&1 &
flood=$!
on_exit "kill $flood 2>/dev/null"
wait_file "$T/flood.started"
kill -TERM "$h_pid"
for i in $(seq 600); do kill -0 "$h_pid" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$h_pid" 2>/dev/null
wait "$h_pid"; rc=$?
wait $flood; frc=$?
if [ $rc -eq 0 ] && sanitizer_clean "$T/h.log"; then ok "SIGTERM with a client that never stops sending: clean exit"
else fail "SIGTERM with a client that never stops sending: clean exit" "rc $rc"; fi
if ! grep -q "of draining" "$T/h.log"; then ok "... the drain ended by itself, not by --drain-timeout"
else fail "... the drain ended by itself, not by --drain-timeout" "$(grep 'of draining' "$T/h.log" | head -2)"; fi
if [ $frc -eq 0 ]; then ok "... every reply the client got is whole ($(cat "$T/flood.out"))"
else fail "... every reply the client got is whole" "$(cat "$T/flood.out")"; fi

check_fails "--drain-timeout 0 is refused" "$VDISKD" --drain-timeout 0 --export "file=$T/c.raw,format=raw"
