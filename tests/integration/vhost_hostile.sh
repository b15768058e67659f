#!/usr/bin/env bash
# A malicious front-end (tests/helpers/vhost_hostile: hand-made rings with
# looping, out-of-memory, wrong-direction, over-long chains, bad heads,
# malformed messages, garbage) against one vdiskd export while a
# well-behaved front-end works on another export of the same daemon: every
# bad request ends in IOERR/UNSUPP, the other export is unaffected, the
# daemon neither crashes nor reports a sanitizer error.
source "$(dirname "$0")/../lib.sh"
H=$VDISK_BUILD/tests/helpers
truncate -s 32M "$T/bad.raw" "$T/good.raw"
"$VDISKD" --nbd "unix:$T/nbd.sock" \
    --export "type=vhost-user-blk,name=bad,file=$T/bad.raw,format=raw,socket=$T/bad.sock,num-queues=2" \
    --export "type=vhost-user-blk,name=good,file=$T/good.raw,format=raw,socket=$T/good.sock,num-queues=2" \
    2> "$T/d.log" &
d=$!
on_exit "kill $d 2>/dev/null"
for _ in $(seq 200); do [ -S "$T/bad.sock" ] && [ -S "$T/good.sock" ] && break; sleep 0.05; done

"$H/vhost_io" --mode fill --queues 2 --qd 16 --bs 4K --seed 51 --rate 4000 "$T/good.sock" > "$T/good.out" 2>&1 &
g=$!
"$H/vhost_hostile" "$T/bad.sock" > "$T/hostile.out" 2>&1; rc=$?
n_ok=$(grep -c '^ok ' "$T/hostile.out"); n_bad=$(grep -c '^not ok ' "$T/hostile.out")
if [ $rc -eq 0 ] && [ "$n_ok" -gt 20 ]; then ok "hostile front-end: $n_ok checks passed"
else fail "hostile front-end: all checks pass" "rc $rc, $n_bad failed: $(grep '^not ok' "$T/hostile.out" | head -5 | tr '\n' ' ')"; fi
wait $g; grc=$?
if [ $grc -eq 0 ]; then ok "the other export kept serving meanwhile"; else fail "the other export kept serving meanwhile" "$(tail -2 "$T/good.out")"; fi
check "the other export's data is right" "$H/vhost_io" --mode verify --queues 2 --qd 16 --bs 64K --seed 51 "$T/good.sock"
check "the attacked export still serves a new front-end" \
    "$H/vhost_io" --mode fill --queues 2 --qd 8 --bs 64K --seed 52 --size 8M "$T/bad.sock"
if kill -0 $d 2>/dev/null; then ok "vdiskd still running"; else fail "vdiskd still running"; fi
kill $d; wait $d 2>/dev/null
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/d.log"; then
    fail "vdiskd: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/d.log")"
else ok "vdiskd: no sanitizer report"; fi
