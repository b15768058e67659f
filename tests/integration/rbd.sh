#!/usr/bin/env bash
# Ceph RBD images (block/proto_rbd.c) against a throwaway single-node cluster
# on 127.0.0.1 (tests/rbd/cluster.sh), checked with the real peers: the rbd
# tool and qemu-img's own rbd driver. A cluster that does not come up fails
# the test loudly.
source "$(dirname "$0")/../lib.sh"

CLUSTER=$VDISK_ROOT/tests/rbd/cluster.sh
on_exit "$CLUSTER stop $T/ceph >/dev/null 2>&1"
if ! CONF=$(RBD_CLUSTER_TIMEOUT=90 "$CLUSTER" start "$T/ceph" rbd 2> "$T/cluster.err"); then
    fail "throwaway Ceph cluster starts" "$(tail -n 20 "$T/cluster.err" | tr '\n' ' ')"
    exit 1
fi
ok "throwaway Ceph cluster starts"

R() { echo "rbd:rbd/$1:conf=$CONF${2:+:$2}"; }      # R IMAGE [OPTS]
rbdc() { timeout 60 rbd -c "$CONF" "$@"; }
MiB=1048576

# The helper drives the library directly (hold an image open, write/verify).
HELPER=$VDISK_BUILD/tests/helpers/rbd_io

# A sparse 64 MiB source: data at 0-1 MiB, 20-21 MiB and 40-44 MiB.
rand_file "$T/d1" 1 1; rand_file "$T/d2" 1 2; rand_file "$T/d3" 4 3
truncate -s 64M "$T/src.raw"
dd if="$T/d1" of="$T/src.raw" bs=1M seek=0 conv=notrunc status=none
dd if="$T/d2" of="$T/src.raw" bs=1M seek=20 conv=notrunc status=none
dd if="$T/d3" of="$T/src.raw" bs=1M seek=40 conv=notrunc status=none

# ---- create ----
check "create -f raw on rbd" $VDISK create -f raw "$(R new1)" 10G
size=$(rbdc info rbd/new1 --format json 2>/dev/null | jq -r .size)
[ "$size" = $((10 * 1024 * MiB)) ] && ok "rbd sees the created size" || fail "rbd sees the created size" "size $size"
check_fails "create refuses an existing image" $VDISK create -f raw "$(R new1)" 1G

# ---- convert raw -> rbd -> raw ----
check "convert raw -> rbd" $VDISK convert -f raw -O raw "$T/src.raw" "$(R img)"
check "qemu-img (its own rbd driver) reads the same data" qemu-img compare -f raw -F raw "$T/src.raw" "$(R img)"
check "convert rbd -> raw" $VDISK convert -f raw -O raw "$(R img)" "$T/back.raw"
check "round trip equals the source" cmp "$T/src.raw" "$T/back.raw"

# ---- info, map ----
out=$($VDISK info --output=json "$(R img)" 2>&1)
[ "$(jq -r '."virtual-size"' <<<"$out" 2>/dev/null)" = $((64 * MiB)) ] && [ "$(jq -r .format <<<"$out")" = raw ] \
    && ok "info on an rbd image" || fail "info on an rbd image" "$out"
$VDISK map --output=json "$(R img)" > "$T/map.json" 2>&1
# data where the source has data, holes in the 4 MiB objects never written
is_data() { jq -e --argjson o "$1" 'map(select(.start <= $o and $o < .start + .length)) | .[0].data' "$T/map.json" >/dev/null; }
if is_data 0 && is_data $((20 * MiB)) && is_data $((42 * MiB)) \
   && ! is_data $((8 * MiB)) && ! is_data $((30 * MiB)) && ! is_data $((60 * MiB)); then
    ok "map shows RBD's allocation (data and holes)"
else
    fail "map shows RBD's allocation (data and holes)" "$(head -c 600 "$T/map.json")"
fi

# ---- library I/O through librbd's aio path ----
check "random 4 KiB writes through the loop" $HELPER write "$(R img)" 7 500
check "they read back" $HELPER verify "$(R img)" 7 500

# ---- exclusive lock ----
mkfifo "$T/hold.in"
$HELPER hold "$(R img)" < "$T/hold.in" > "$T/hold.out" 2>&1 &
holder=$!
exec 7> "$T/hold.in"
on_exit "exec 7>&-; kill $holder 2>/dev/null"
for _ in $(seq 100); do grep -q open "$T/hold.out" && break; sleep 0.1; done
grep -q open "$T/hold.out" && ok "first writer holds the image" || fail "first writer holds the image" "$(cat "$T/hold.out")"
out=$($HELPER write "$(R img)" 8 1 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "open for writing elsewhere" <<<"$out" \
    && ok "a second writer is refused with a clear error" || fail "a second writer is refused with a clear error" "rc $rc: $out"
check "a reader is still served while the writer holds the lock" $HELPER verify "$(R img)" 7 500
exec 7>&-; wait $holder
check "after the writer closes, another takes over" $HELPER write "$(R img)" 9 50

# ---- errors: bounded in time, clear ----
sed -E 's/^mon host = .*/mon host = v2:127.0.0.1:46998/' "$CONF" > "$T/dead.conf"
t0=$SECONDS
out=$($VDISK info "rbd:rbd/img:conf=$T/dead.conf:timeout=3" 2>&1); rc=$?
el=$((SECONDS - t0))
[ $rc -ne 0 ] && [ $el -le 15 ] && grep -q "cannot reach the Ceph cluster" <<<"$out" \
    && ok "unreachable cluster: clear error within its timeout (${el}s)" || fail "unreachable cluster: clear error within its timeout" "rc $rc after ${el}s: $out"
t0=$SECONDS
out=$(VDISK_RBD_TIMEOUT=2 $VDISK info "rbd:rbd/img:conf=$T/dead.conf" 2>&1); rc=$?
el=$((SECONDS - t0))
[ $rc -ne 0 ] && [ $el -le 12 ] && grep -q "within 2 s" <<<"$out" \
    && ok "VDISK_RBD_TIMEOUT bounds the wait (${el}s)" || fail "VDISK_RBD_TIMEOUT bounds the wait" "rc $rc after ${el}s: $out"
out=$($VDISK info "$(R nosuch)" 2>&1)
grep -q "does not exist" <<<"$out" && ok "missing image: clear error" || fail "missing image: clear error" "$out"
out=$($VDISK info "rbd:nopool/img:conf=$CONF" 2>&1)
grep -q "pool 'nopool' does not exist" <<<"$out" && ok "missing pool: clear error" || fail "missing pool: clear error" "$out"
check_fails "malformed name" $VDISK info "rbd:justapool:conf=$CONF"
check_fails "bad timeout" $VDISK info "$(R img timeout=abc)"
check_fails "unknown Ceph option" $VDISK info "$(R img no_such_ceph_option=1)"

# A dead OSD (stopped, not killed): an error within the timeout, not a hang.
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
t0=$SECONDS
out=$($VDISK convert -f raw -O raw "$(R img timeout=3)" "$T/x.raw" 2>&1); rc=$?
el=$((SECONDS - t0))
kill -CONT "$osd"
[ $rc -ne 0 ] && [ $el -le 20 ] && grep -qiE "no answer|timed out" <<<"$out" \
    && ok "dead OSD: clear error within the timeout (${el}s)" || fail "dead OSD: clear error within the timeout" "rc $rc after ${el}s: $out"
check "the cluster serves again after the OSD comes back" $HELPER verify "$(R img)" 9 50
