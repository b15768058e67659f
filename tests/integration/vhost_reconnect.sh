#!/usr/bin/env bash
# vdiskd restart with I/O in flight: the front-end library writes a
# pattern over the whole disk at depth 32 on 2 queues; the back-end is
# killed (SIGKILL) and started again twice meanwhile; the front-end
# reconnects, the new back-end resubmits what the old one had taken
# (inflight tracking), and every byte is then verified.
source "$(dirname "$0")/../lib.sh"
H=$VDISK_BUILD/tests/helpers
IO=$H/vhost_io
IMG=$T/r.raw SOCK=$T/r.sock

# The killed back-end's image lock goes away only when the kernel has
# torn down its io_uring, a moment after the process is gone: retry.
start() {
    for _ in $(seq 100); do
        "$VDISKD" --nbd "unix:$T/nbd.sock" \
            --export "type=vhost-user-blk,file=$IMG,format=raw,cache=none,socket=$SOCK,num-queues=2" 2>> "$T/serve.log" &
        SERVER=$!
        for _ in $(seq 200); do
            [ -S "$SOCK" ] && { on_exit "kill $SERVER 2>/dev/null"; return 0; }
            kill -0 $SERVER 2>/dev/null || break
            sleep 0.02
        done
        wait $SERVER 2>/dev/null
        sleep 0.05
    done
    echo "# back-end did not start:"; sed 's/^/# /' "$T/serve.log"
    return 1
}

truncate -s 64M "$IMG"
start
"$IO" --mode fill --queues 2 --qd 32 --bs 4K --seed 31 --rate 8000 --reconnect 20000 "$SOCK" > "$T/io.out" 2>&1 &
io=$!
on_exit "kill $io 2>/dev/null"
for round in 1 2; do
    sleep 0.6
    kill -9 $SERVER; wait $SERVER 2>/dev/null
    rm -f "$SOCK"
    start
done
wait $io; rc=$?
cat "$T/io.out" | sed 's/^/# /'
if [ $rc -eq 0 ]; then ok "fill completed across two back-end restarts"
else fail "fill completed across two back-end restarts" "$(tail -3 "$T/io.out")"; sed 's/^/# /' "$T/serve.log"; fi
n=$(grep -o '[0-9]* reconnects' "$T/io.out" | cut -d' ' -f1)
if [ "${n:-0}" -ge 1 ]; then ok "the front-end reconnected ($n times)"; else fail "the front-end reconnected" "reconnects: ${n:-none}"; fi
grep 'resubmitted' "$T/serve.log" | sed 's/^/# /'
check "every byte written (verify through a fresh connection)" \
    "$IO" --mode verify --queues 2 --qd 32 --bs 256K --seed 31 "$SOCK"
kill $SERVER; wait $SERVER 2>/dev/null
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve.log"; then
    fail "back-end: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve.log")"
else ok "back-end: no sanitizer report"; fi
