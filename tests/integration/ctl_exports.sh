#!/usr/bin/env bash
# The control socket: add, list, remove exports while NBD clients are
# connected; statistics; events; errors; quit.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

C=$T/ctl.sock
S=$T/nbd.sock
# ctl COMMAND [ARGS-JSON]: one request, prints the reply line (events skipped).
cat > "$T/ctl.py" <<'PYEOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile('rw')
greeting = json.loads(f.readline())
assert 'greeting' in greeting
req = {'execute': sys.argv[2], 'id': 1}
if len(sys.argv) > 3:
    req['arguments'] = json.loads(sys.argv[3])
f.write(json.dumps(req) + '\n')
f.flush()
while True:
    line = f.readline()
    if not line:
        sys.exit('connection closed')
    msg = json.loads(line)
    if 'event' not in msg:
        print(line.strip())
        sys.exit(0 if 'return' in msg else 1)
PYEOF
printf '#!/bin/sh\nexec %s %s %s "$@"\n' "$PY" "$T/ctl.py" "$C" > "$T/ctl"
chmod +x "$T/ctl"
ctl() { "$T/ctl" "$@"; }
export -f ctl
export T

truncate -s 32M "$T/a.raw" "$T/b.raw" "$T/v0.raw"
rand_file "$T/blob" 1 seedc
dd if="$T/blob" of="$T/a.raw" bs=1M seek=1 conv=notrunc status=none
start_vdiskd d --nbd "unix:$S" --control "$C" --export "name=a,file=$T/a.raw,format=raw" || exit 1

# An event listener that records everything it is sent.
$PY - "$C" > "$T/events.log" <<'PYEOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
for line in s.makefile('r'):
    print(line.strip(), flush=True)
PYEOF
evpid=$!
on_exit "kill $evpid 2>/dev/null"

# A client that stays connected to export a and keeps reading.
$PY - "$S" > "$T/client.log" 2>&1 <<'PYEOF' &
import nbd, sys, time
h = nbd.NBD(); h.set_export_name('a'); h.connect_unix(sys.argv[1])
print('connected', flush=True)
try:
    while True:
        h.pread(4096, 1 << 20)
        time.sleep(0.01)
except nbd.Error as e:
    print('disconnected:', e, flush=True)
PYEOF
clpid=$!
on_exit "kill $clpid 2>/dev/null"
for i in $(seq 100); do grep -q connected "$T/client.log" && break; sleep 0.05; done

check "query-version" bash -o pipefail -c "ctl query-version | jq -e '.return.program == \"vdiskd\"'"
check "export-add b while a client is connected to a" bash -o pipefail -c \
    "ctl export-add '{\"name\":\"b\",\"file\":\"$T/b.raw\",\"format\":\"raw\",\"description\":\"second\"}' | jq -e '.return.name == \"b\" and .return.\"virtual-size\" == 33554432'"
check "export-add with readonly and format" bash -o pipefail -c \
    "ctl export-add '{\"name\":\"c\",\"file\":\"$T/blob\",\"readonly\":true,\"format\":\"raw\"}' | jq -e '.return.readonly == true'"
check "query-exports lists a, b, c" bash -o pipefail -c "ctl query-exports | jq -e '[.return[].name] == [\"a\",\"b\",\"c\"]'"
check "the new export serves NBD" bash -o pipefail -c "[ \"\$(nbdinfo --size 'nbd+unix:///b?socket=$S')\" = 33554432 ]"
check "nbdinfo --list shows the description" bash -o pipefail -c "nbdinfo --list --json 'nbd+unix:///?socket=$S' | jq -e '[.exports[] | select(.\"export-name\" == \"b\") | .description] == [\"second\"]'"
nbdcopy "$T/blob" "nbd+unix:///b?socket=$S"
check "query-stats: operations, bytes, latency percentiles" bash -o pipefail -c \
    "ctl query-stats '{\"name\":\"a\"}' | jq -e '.return[0].read.operations > 0 and .return[0].read.bytes >= 4096 and .return[0].read.\"latency-us\".p99 >= .return[0].read.\"latency-us\".p50 and .return[0].connections == 1'"
check "query-stats counts writes on b" bash -o pipefail -c "ctl query-stats '{\"name\":\"b\"}' | jq -e '.return[0].write.bytes == 1048576'"

check_fails "export-add: duplicate name" ctl export-add "{\"name\":\"b\",\"file\":\"$T/b.raw\",\"format\":\"raw\"}"
check_fails "export-add: missing file" ctl export-add "{\"name\":\"x\",\"file\":\"$T/nosuch\"}"
check_fails "export-add: image already open (locked)" ctl export-add "{\"name\":\"y\",\"file\":\"$T/a.raw\",\"format\":\"raw\"}"
check_fails "export-add: a raw image without format=raw is refused" ctl export-add "{\"name\":\"w\",\"file\":\"$T/v0.raw\"}"
check_fails "export-add: unknown option" ctl export-add "{\"name\":\"z\",\"file\":\"$T/b.raw\",\"format\":\"raw\",\"bogus\":1}"
check_fails "export-add: unknown type" ctl export-add "{\"name\":\"z\",\"file\":\"$T/b.raw\",\"format\":\"raw\",\"type\":\"carrier-pigeon\"}"
check_fails "unknown command" ctl no-such-command
check_fails "export-del: unknown export" ctl export-del '{"name":"nosuch"}'
check "garbage on the control socket gets an error, the daemon lives on" bash -o pipefail -c \
    "printf '{not json\n\n[1,2]\n' | $PY -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(\"$C\"); s.sendall(sys.stdin.buffer.read()); s.shutdown(1); print(s.makefile().read())' | grep -c '\"error\"' | grep -qx 2 && ctl query-version >/dev/null"

check_fails "export-del mode=safe refuses while a client is connected" ctl export-del '{"name":"a","mode":"safe"}'
check "export-del a while its client is connected: drained and removed" ctl export-del '{"name":"a"}'
for i in $(seq 100); do grep -q disconnected "$T/client.log" && break; sleep 0.05; done
check "the connected client was disconnected" grep -q disconnected "$T/client.log"
check "query-exports no longer lists a" bash -o pipefail -c "ctl query-exports | jq -e '[.return[].name] == [\"b\",\"c\"]'"
check_fails "a is gone for new clients" nbdinfo --size "nbd+unix:///a?socket=$S"
check "a's image is closed and unlocked: it can be added again" bash -o pipefail -c \
    "ctl export-add '{\"name\":\"a2\",\"file\":\"$T/a.raw\",\"format\":\"raw\"}' >/dev/null && cmp <(nbdcopy 'nbd+unix:///a2?socket=$S' - ) '$T/a.raw'"
check "b still serves" bash -o pipefail -c "nbdcopy 'nbd+unix:///b?socket=$S' '$T/bout.raw' && cmp <(head -c 1M '$T/bout.raw') '$T/blob'"
check "block-resize grows b; a new connection sees the new size" bash -o pipefail -c \
    "ctl block-resize '{\"name\":\"b\",\"size\":50331648}' >/dev/null && [ \"\$(nbdinfo --size 'nbd+unix:///b?socket=$S')\" = 50331648 ]"
check "block-resize: b's data is unchanged and the grown part reads zeros" bash -o pipefail -c \
    "cmp <(nbdcopy 'nbd+unix:///b?socket=$S' - | head -c 1M) '$T/blob' && [ \"\$(nbdcopy 'nbd+unix:///b?socket=$S' - | tail -c 16M | tr -d '\\0' | wc -c)\" = 0 ]"
check_fails "block-resize: missing size" ctl block-resize '{"name":"b"}'
check_fails "block-resize: size not a number" ctl block-resize '{"name":"b","size":"48M"}'
check_fails "block-resize: size not a multiple of 512" ctl block-resize '{"name":"b","size":1000}'
check_fails "block-resize: unknown export" ctl block-resize '{"name":"nosuch","size":1048576}'
check_fails "block-resize: read-only export" ctl block-resize '{"name":"c","size":1048576}'
check_fails "vhost-user-blk-resize: not a vhost-user-blk export" ctl vhost-user-blk-resize '{"name":"b","size":1048576}'
check "block-resize errors name the cause" bash -c \
    "ctl block-resize '{\"name\":\"b\",\"size\":1000}' | grep -q 'not a multiple of 512'"
check "events: EXPORT_ADDED and EXPORT_DELETED were broadcast" bash -o pipefail -c \
    "grep -q '\"event\":\"EXPORT_ADDED\".*\"name\":\"b\"' '$T/events.log' && grep -q '\"event\":\"EXPORT_DELETED\".*\"name\":\"a\"' '$T/events.log'"

# The same through the CLI client.
truncate -s 8M "$T/v.raw"
check "vdisk ctl export-add with key=value arguments" bash -o pipefail -c \
    "'$VDISK' ctl '$C' export-add name=v,file='$T/v.raw',format=raw,readonly=on | jq -e '.readonly == true and .name == \"v\"'"
check "vdisk ctl query-exports prints the list" bash -o pipefail -c \
    "'$VDISK' ctl '$C' query-exports | jq -e '[.[].name] | index(\"v\") != null'"
check "vdisk ctl with a JSON object" bash -o pipefail -c \
    "'$VDISK' ctl '$C' query-stats '{\"name\":\"v\"}' | jq -e '.[0].name == \"v\"'"
check "vdisk ctl export-del" "$VDISK" ctl "$C" export-del name=v
check_fails "vdisk ctl: an error from the daemon exits 1 with its message" "$VDISK" ctl "$C" export-del name=v
check_fails "vdisk ctl: a socket nobody listens on" "$VDISK" ctl "$T/nosuch.sock" query-exports
check_fails "vdisk ctl: arguments that are neither JSON nor key=value" "$VDISK" ctl "$C" export-add junk

check "quit" "$VDISK" ctl "$C" quit
wait $d_pid; rc=$?
if [ $rc -eq 0 ] && sanitizer_clean "$T/d.log"; then ok "daemon exited cleanly after quit"
else fail "daemon exited cleanly after quit" "rc $rc $(grep -m3 -E 'Sanitizer|runtime error' "$T/d.log")"; fi
check "control and NBD sockets removed" bash -o pipefail -c "[ ! -e '$C' ] && [ ! -e '$S' ]"
