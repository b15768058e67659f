#!/usr/bin/env bash
# Shutdown with control commands in flight: every request gets exactly one
# reply. Export a's qcow2 sits on an NBD server (nbdkit) that is stopped
# (SIGSTOP), so export-del a stalls on the command thread; two more
# clients queue blocking commands behind it (one with a second request
# pipelined behind its first). On SIGTERM the queued commands must be
# answered at once with a shutdown error naming the command and echoing
# the id, without running, while export-del a is still stuck; a client
# that connects after that gets the same error for its request; once the
# NBD server is resumed export-del a finishes and its real reply is sent,
# every connection closes after its replies and the daemon exits 0.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

for p in nbdkit qemu-img qemu-io; do
    command -v $p >/dev/null || { echo "1..0 # SKIP $p missing"; exit 0; }
done

C=$T/ctl.sock
# client.py SOCKET LOG WAIT-GREETING(0|1) REQUEST...: sends the requests in one
# write, then logs every line it gets until the daemon closes the socket,
# then "EOF" (or "RESET ..." if it was reset). With WAIT-GREETING=0 it sends before reading anything.
cat > "$T/client.py" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
log = open(sys.argv[2], 'w')
f = s.makefile('rb')
if sys.argv[3] == '1':
    log.write(f.readline().decode().strip() + '\n'); log.flush()
s.sendall(''.join(r + '\n' for r in sys.argv[4:]).encode())
log.write('SENT\n'); log.flush()
try:
    for line in f:
        log.write(line.decode().strip() + '\n'); log.flush()
    log.write('EOF\n')
except OSError as e:
    log.write('RESET %s\n' % e)
log.flush()
PYEOF
client() { local name=$1; shift; $PY "$T/client.py" "$C" "$T/$name.log" "$@" & eval "${name}_pid=$!"; on_exit "kill $! 2>/dev/null"; }
# replies NAME: the client's reply lines (neither greeting nor event nor markers)
replies() { grep -v -e '^SENT$' -e '^EOF$' -e '"greeting"' -e '"event"' "$T/$1.log"; }
wait_for() { local i; for i in $(seq 200); do eval "$1" 2>/dev/null && return 0; sleep 0.05; done; return 1; }
wait_sock() { wait_for "[ -S '$1' ]"; }

s1=
pids_cleanup() { [ -n "$s1" ] && kill -CONT "$s1" 2>/dev/null; return 0; }
on_exit pids_cleanup

mkdir "$T/s1"
qemu-img create -q -f qcow2 "$T/s1/a.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0x11 0 4M" "$T/s1/a.qcow2" > /dev/null
qemu-img create -q -f qcow2 "$T/b.qcow2" 64M
qemu-img create -q -f qcow2 "$T/c.qcow2" 64M
nbdkit -U "$T/s1.sock" -P "$T/s1.pid" file dir="$T/s1"
on_exit 'kill $(cat "$T/s1.pid") 2>/dev/null'
wait_sock "$T/s1.sock" || { fail "nbdkit starts"; exit 0; }

start_vdiskd d --nbd "unix:$T/d.sock" --control "$C" --log-level=error \
    --export "name=a,file=nbd+unix:///a.qcow2?socket=$T/s1.sock,format=qcow2" \
    --export "name=b,file=$T/b.qcow2,format=qcow2" \
    --export "name=c,file=$T/c.qcow2,format=qcow2" || exit 1
# Dirty a: its final flush at export-del then has to reach the NBD server.
check "a write through export a" qemu-io -f raw -c "write -P 0x33 1M 64k" "nbd+unix:///a?socket=$T/d.sock"

s1=$(cat "$T/s1.pid")
kill -STOP "$s1"
client c1 1 '{"execute":"export-del","arguments":{"name":"a"},"id":"c1"}'
wait_for "grep -q SENT '$T/c1.log'"
client c2 1 '{"execute":"block-resize","arguments":{"name":"b","size":134217728},"id":"c2"}'
client c3 1 '{"execute":"export-del","arguments":{"name":"c"},"id":"c3"}' \
    '{"execute":"query-exports","id":{"n":3}}'
wait_for "grep -q SENT '$T/c2.log' && grep -q SENT '$T/c3.log'"
sleep 1
if [ -z "$(replies c1)$(replies c2)$(replies c3)" ]; then
    ok "export-del a is stalled by the stopped NBD server, the others queued behind it"
else
    fail "export-del a is stalled by the stopped NBD server, the others queued behind it" \
        "$(cat "$T"/c[123].log | tr '\n' ' ')"
fi

kill -TERM "$d_pid"
# Queued commands are answered at once, while export-del a still waits.
wait_for "[ \$(replies c2 | wc -l) -ge 1 ] && [ \$(replies c3 | wc -l) -ge 2 ]"
check "the queued block-resize gets the shutdown error, with its id" bash -o pipefail -c \
    "grep -v -e '^SENT\$' -e '^EOF\$' -e greeting -e '\"event\"' '$T/c2.log' | jq -se 'length == 1 and .[0].error.class == \"GenericError\" and .[0].error.desc == \"vdiskd is shutting down: block-resize was not run\" and .[0].id == \"c2\"'"
check "the queued export-del and the request pipelined behind it get one shutdown error each" bash -o pipefail -c \
    "grep -v -e '^SENT\$' -e '^EOF\$' -e greeting -e '\"event\"' '$T/c3.log' | jq -se 'length == 2 and .[0].error.desc == \"vdiskd is shutting down: export-del was not run\" and .[0].id == \"c3\" and .[1].error.desc == \"vdiskd is shutting down: query-exports was not run\" and .[1].id == {\"n\":3}'"
check "the daemon waits for the stalled export-del meanwhile" kill -0 "$d_pid"
check "  and export-del a has no reply yet" bash -c "[ -z \"\$(grep -v -e '^SENT\$' -e greeting -e '\"event\"' '$T/c1.log')\" ]"
# A client that connects now is accepted only when the daemon closes the
# socket; its request, sent meanwhile, gets the shutdown error too.
client c4 0 '{"execute":"query-version","id":4}'
wait_for "grep -q SENT '$T/c4.log'"

kill -CONT "$s1"; s1=
wait "$d_pid"; rc=$?
if [ $rc -eq 0 ] && sanitizer_clean "$T/d.log"; then ok "the daemon exits 0 once the NBD server is back"
else fail "the daemon exits 0 once the NBD server is back" "rc $rc: $(grep -m4 -E 'Sanitizer|runtime error|#[0-9]+ |error' "$T/d.log" | tr '\n' ' ')"; fi
for c in c1 c2 c3 c4; do
    wait "$(eval echo "\$${c}_pid")"
done
check "export-del a finished: its one reply is a success, with its id" bash -o pipefail -c \
    "grep -v -e '^SENT\$' -e '^EOF\$' -e greeting -e '\"event\"' '$T/c1.log' | jq -se 'length == 1 and .[0].return == {} and .[0].id == \"c1\"'"
check "  and EXPORT_DELETED for a came after it" bash -o pipefail -c \
    "grep -A100 '\"id\":\"c1\"' '$T/c1.log' | grep -q '\"event\":\"EXPORT_DELETED\".*\"name\":\"a\"'"
check "the client that connected during shutdown got the greeting and one shutdown error" bash -o pipefail -c \
    "grep -q greeting '$T/c4.log' && grep -v -e '^SENT\$' -e '^EOF\$' -e greeting -e '\"event\"' '$T/c4.log' | jq -se 'length == 1 and .[0].error.desc == \"vdiskd is shutting down: query-version was not run\" and .[0].id == 4'"
check "every client saw its connection closed after its replies" bash -c \
    "for c in c1 c2 c3 c4; do [ \"\$(tail -1 '$T/'\$c.log)\" = EOF ] || exit 1; done"
check "control socket removed" bash -c "[ ! -e '$C' ]"
check "qemu-img check of a" qemu-img check -q -f qcow2 "$T/s1/a.qcow2"
check "  a has the data written before the stall" qemu-io -f qcow2 -c "read -P 0x33 1M 64k" -c "read -P 0x11 0 1M" "$T/s1/a.qcow2"
check "qemu-img check of b and c" bash -c "qemu-img check -q -f qcow2 '$T/b.qcow2' && qemu-img check -q -f qcow2 '$T/c.qcow2'"
check "the block-resize that was not run left b's size alone" bash -o pipefail -c \
    "qemu-img info --output=json '$T/b.qcow2' | jq -e '.\"virtual-size\" == 67108864'"
echo "1..$_n"
