#!/usr/bin/env bash
# Ceph RBD images (block/proto_rbd.c) against a throwaway single-node cluster
# on 127.0.0.1 (tests/rbd/cluster.sh), checked with the real peers: the rbd
# tool and qemu-img's own rbd driver. A cluster that does not come up fails
# the test loudly.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"
source "$VDISK_ROOT/tests/helpers/rbd_common.bash"

# Cleanups run in order: this one first stops what may still use the
# cluster (a daemon closing against a stopped cluster would wait for its
# timeout), then the cluster.
rbd_cleanup() {
    local v p
    for v in a b c d f g v z zd holder holder2; do
        p=$(eval echo "\${${v}_pid:-\${$v:-}}")
        [ -n "$p" ] && kill -9 "$p" 2>/dev/null
    done
    "$CLUSTER" stop "$T/ceph" > /dev/null 2>&1
}
on_exit rbd_cleanup
rbd_cluster_up

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

# names: a namespace, and an escaped ':' in the image name, parsed as qemu-img does
rbdc namespace create rbd/ns1 > /dev/null 2>&1
check "create in a namespace (rbd:POOL/NS/IMAGE)" $VDISK create -f raw "rbd:rbd/ns1/nsimg:conf=$CONF" 16M
grep -qx nsimg <<<"$(rbdc ls rbd/ns1 2>/dev/null)" && ok "rbd lists it in the namespace" || fail "rbd lists it in the namespace" "$(rbdc ls rbd/ns1 2>&1)"
out=$(qemu-img info --output=json "rbd:rbd/ns1/nsimg:conf=$CONF" 2>&1)
[ "$(jq -r '."virtual-size"' <<<"$out" 2>/dev/null)" = $((16 * MiB)) ] && ok "qemu-img finds it under the same name" || fail "qemu-img finds it under the same name" "$out"
check "an escaped ':' belongs to the image name" $VDISK create -f raw "rbd:rbd/a\\:b:conf=$CONF" 16M
grep -qx 'a:b' <<<"$(rbdc ls rbd 2>/dev/null)" && ok "rbd lists image 'a:b'" || fail "rbd lists image 'a:b'" "$(rbdc ls rbd 2>&1)"

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

# ---- qcow2 ----
qemu-img convert -f raw -O qcow2 "$T/src.raw" "$T/src.qcow2"
check "convert qcow2 -> rbd" $VDISK convert -f qcow2 -O raw "$T/src.qcow2" "$(R fromq)"
check "convert that rbd image -> raw" $VDISK convert -f raw -O raw "$(R fromq)" "$T/back2.raw"
check "qcow2 -> rbd -> raw round trip equals the source" cmp "$T/src.raw" "$T/back2.raw"
check "create -f qcow2 layered on an rbd image" $VDISK create -f qcow2 "$(R q0)" 1G
out=$($VDISK info --output=json "$(R q0)" 2>&1)
[ "$(jq -r .format <<<"$out" 2>/dev/null)" = qcow2 ] && [ "$(jq -r '."virtual-size"' <<<"$out")" = $((1024 * MiB)) ] \
    && ok "info probes qcow2 on rbd" || fail "info probes qcow2 on rbd" "$out"
check "convert raw -> qcow2 on rbd" $VDISK convert -f raw -O qcow2 "$T/src.raw" "$(R q1)"
check "qemu-img reads vdisk's qcow2 on rbd as the source" qemu-img compare -f raw -F qcow2 "$T/src.raw" "$(R q1)"
check "qemu-img check finds the qcow2 on rbd clean" qemu-img check -f qcow2 "$(R q1)"
# writes past the end grow the image ahead in steps (64 MiB here); close trims it back
size=$(rbdc info rbd/q1 --format json 2>/dev/null | jq -r .size)
end=$(qemu-img check --output=json -f qcow2 "$(R q1)" 2>/dev/null | jq -r '."image-end-offset"')
[ -n "$size" ] && [ -n "$end" ] && [ "$size" -ge "$end" ] && [ "$size" -lt $((end + 4 * MiB)) ] \
    && ok "the grown rbd image is trimmed to its content at close ($size bytes)" || fail "the grown rbd image is trimmed at close" "size $size, qcow2 end $end"
check "convert qcow2 on rbd -> raw" $VDISK convert -O raw "$(R q1)" "$T/back3.raw"
check "and it equals the source" cmp "$T/src.raw" "$T/back3.raw"

# ---- resize ----
check "resize grows an rbd image" $VDISK resize -f raw "$(R new1)" +1G
size=$(rbdc info rbd/new1 --format json 2>/dev/null | jq -r .size)
[ "$size" = $((11 * 1024 * MiB)) ] && ok "rbd sees the new size" || fail "rbd sees the new size" "size $size"
check "resize --shrink" $VDISK resize -f raw --shrink "$(R new1)" 1G
size=$(rbdc info rbd/new1 --format json 2>/dev/null | jq -r .size)
[ "$size" = $((1024 * MiB)) ] && ok "rbd sees the shrunk size" || fail "rbd sees the shrunk size" "size $size"

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

# ---- vdiskd: NBD export of an rbd image ----
NBD="nbd+unix:///e?socket=$T/a.sock"
rbdc create rbd/exp --size 128M
start_vdiskd a --nbd "unix:$T/a.sock" --threads 2 --log-level=warning \
    --export "name=e,file=$(R exp),format=raw" || exit 1
fiojob() {   # fiojob URI EXTRA... : 4 KiB random writes at QD32 on the first 32 MiB
    fio --name=rbd --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 --size=32M \
        --verify=crc32c --verify_fatal=1 --verify_state_save=0 --randseed=42 --output-format=terse "${@:2}" 2>&1
}
out=$(fiojob "$NBD" --do_verify=1); rc=$?
[ $rc -eq 0 ] && ! grep -qi "verify.*fail\|bad magic" <<<"$out" \
    && ok "fio over NBD on an rbd image: randwrite QD32, crc32c verified" || fail "fio over NBD on an rbd image" "$(tail -3 <<<"$out" | tr '\n' ' ')"
map=$(nbdinfo --map=base:allocation "$NBD" 2>&1)
if awk '$1 == 0 && $2 == 33554432 && $4 == "data" {d=1} $1 == 33554432 && $4 ~ /hole/ {h=1} END {exit !(d && h)}' <<<"$map"; then
    ok "NBD base:allocation from RBD's allocation: data, then a hole never written"
else
    fail "NBD base:allocation from RBD's allocation" "$(head -4 <<<"$map" | tr '\n' ' ')"
fi
# discard through NBD deallocates: whole objects go, and block status says so
check "NBD trim of 8 MiB on the rbd export" qemu-io -f raw -c 'discard 8M 8M' -c 'read -P 0 8M 8M' "$NBD"
map=$(nbdinfo --map=base:allocation "$NBD" 2>&1)
if awk '$1 <= 8388608 && $1 + $2 >= 16777216 && $4 ~ /hole/ {h=1} END {exit !h}' <<<"$map"; then
    ok "after the trim, base:allocation reports a hole there"
else
    fail "after the trim, base:allocation reports a hole there" "$(head -6 <<<"$map" | tr '\n' ' ')"
fi
check "data around the trimmed range is intact" qemu-io -f raw -c 'read -v 0 512' "$NBD"

# a second daemon on the same image is refused: the first holds the lock
out=$("$VDISKD" --nbd "unix:$T/b.sock" --export "name=e,file=$(R exp),format=raw" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "open for writing elsewhere" <<<"$out" \
    && ok "a second vdiskd on the image is refused (exclusive lock)" || fail "a second vdiskd on the image is refused" "rc $rc: $out"
check "a read-only open still works meanwhile" $VDISK info "$(R exp)"

# hand-over: the writer's data, written through daemon a, verified through daemon b
out=$(fiojob "$NBD" --do_verify=0 --randseed=43); rc=$?
[ $rc -eq 0 ] && ok "writer on daemon a" || fail "writer on daemon a" "$(tail -3 <<<"$out" | tr '\n' ' ')"
stop_vdiskd a
start_vdiskd b --nbd "unix:$T/b.sock" --threads 2 --log-level=warning \
    --export "name=e,file=$(R exp),format=raw" || exit 1
out=$(fiojob "nbd+unix:///e?socket=$T/b.sock" --verify_only --randseed=43); rc=$?
[ $rc -eq 0 ] && ! grep -qi "verify.*fail\|bad magic" <<<"$out" \
    && ok "hand-over: daemon b serves what a wrote, no copy" || fail "hand-over: daemon b serves what a wrote" "$(tail -3 <<<"$out" | tr '\n' ' ')"
stop_vdiskd b

# hand-over after a crash: daemon f dies (SIGKILL) holding the lock; a new
# opener is told so within its lock_timeout, and daemon g gets the image once
# the cluster drops f's watch (10 s in the test cluster), with what f had flushed
start_vdiskd f --nbd "unix:$T/f.sock" --log-level=warning \
    --export "name=e,file=$(R exp),format=raw" || exit 1
out=$(fiojob "nbd+unix:///e?socket=$T/f.sock" --do_verify=0 --randseed=44 --end_fsync=1); rc=$?
[ $rc -eq 0 ] && ok "writer on daemon f (flushed)" || fail "writer on daemon f (flushed)" "$(tail -3 <<<"$out" | tr '\n' ' ')"
kill -KILL "$f_pid"; wait "$f_pid" 2>/dev/null
t0=$SECONDS
# (detect_leaks=0: the process exits while librbd still waits for the lock)
out=$(ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 $HELPER write "$(R exp lock_timeout=3)" 1 1 2>&1); rc=$?
el=$((SECONDS - t0))
[ $rc -eq 1 ] && [ $el -le 15 ] && grep -q "did not answer within 3 s" <<<"$out" \
    && ok "crashed owner: a new writer is told within lock_timeout (${el}s)" || fail "crashed owner: a new writer is told within lock_timeout" "rc $rc after ${el}s: $out"
rm -f "$T/g.pid"
"$VDISKD" --pidfile "$T/g.pid" --nbd "unix:$T/g.sock" --log-level=warning \
    --export "name=e,file=$(R exp),format=raw" 2> "$T/g.log" &
g_pid=$!
on_exit "kill $g_pid 2>/dev/null; wait $g_pid 2>/dev/null"
t0=$SECONDS
for _ in $(seq 600); do [ -S "$T/g.sock" ] && [ -s "$T/g.pid" ] && break; kill -0 "$g_pid" 2>/dev/null || break; sleep 0.1; done
el=$((SECONDS - t0))
if [ -S "$T/g.sock" ]; then ok "crashed owner: daemon g takes the lock over (${el}s)"
else fail "crashed owner: daemon g takes the lock over" "after ${el}s: $(head -5 "$T/g.log" | tr '\n' ' ')"; fi
out=$(fiojob "nbd+unix:///e?socket=$T/g.sock" --verify_only --randseed=44); rc=$?
[ $rc -eq 0 ] && ! grep -qi "verify.*fail\|bad magic" <<<"$out" \
    && ok "crashed owner: daemon g serves what f flushed" || fail "crashed owner: daemon g serves what f flushed" "$(tail -3 <<<"$out" | tr '\n' ' ')"
stop_vdiskd g

# the whole stack: qcow2 on rbd, exported
start_vdiskd c --nbd "unix:$T/c.sock" --threads 2 --log-level=warning \
    --export "name=q,file=$(R q0)" || exit 1
out=$(fiojob "nbd+unix:///q?socket=$T/c.sock" --do_verify=1); rc=$?
[ $rc -eq 0 ] && ! grep -qi "verify.*fail\|bad magic" <<<"$out" \
    && ok "fio over NBD on qcow2 on rbd, crc32c verified" || fail "fio over NBD on qcow2 on rbd" "$(tail -3 <<<"$out" | tr '\n' ' ')"
stop_vdiskd c
check "qemu-img check: the qcow2 on rbd is clean after the run" qemu-img check -f qcow2 "$(R q0)"

# a dead OSD under a running export: each request fails within the timeout,
# the export serves again once the OSD is back
start_vdiskd d --nbd "unix:$T/d.sock" --log-level=error \
    --export "name=e,file=$(R exp timeout=3),format=raw" || exit 1
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
t0=$SECONDS
out=$(timeout 60 qemu-io -f raw -c 'read 0 4k' -c 'write -P 7 1M 4k' "nbd+unix:///e?socket=$T/d.sock" 2>&1); rc=$?
el=$((SECONDS - t0))
kill -CONT "$osd"
[ $rc -ne 124 ] && [ $el -le 20 ] && grep -q "read failed" <<<"$out" && grep -q "write failed" <<<"$out" \
    && ok "dead OSD under an export: requests fail within the timeout (${el}s)" || fail "dead OSD under an export: requests fail within the timeout" "rc $rc after ${el}s: $out"
check "the export serves again after the OSD comes back" \
    timeout 60 qemu-io -f raw -c 'write -P 7 1M 4k' -c 'read -P 7 1M 4k' "nbd+unix:///e?socket=$T/d.sock"
stop_vdiskd d

# ---- discard and write-zeroes through the NBD export ----
# librbd's asynchronous calls: the same random mix of writes, discards and
# zero writes (with and without leave to deallocate) goes to the export and
# to a local shadow file; both must read the same.
rbdc create rbd/zr --size 64M
rand_file "$T/zsrc" 64 5
cp "$T/zsrc" "$T/zshadow"
truncate -s 16M "$T/local.raw"
check "fill the image for the zeroing test" $VDISK convert -f raw -O raw -n "$T/zsrc" "$(R zr)"
# one loop thread: the rbd export and a local one share it
start_vdiskd z --nbd "unix:$T/z.sock" --threads 1 --log-level=error \
    --export "name=z,file=$(R zr),format=raw" --export "name=loc,file=$T/local.raw,format=raw" || exit 1
ZN="nbd+unix:///z?socket=$T/z.sock"
# offsets and lengths in 512-byte units, some within one 4 MiB object, some across several
awk 'BEGIN { srand(77); M = 131072
    for (i = 0; i < 60; i++) {
        o = int(rand() * M); l = 1 + int(rand() * (rand() < 0.5 ? 64 : 24576)); if (o + l > M) l = M - o
        k = int(rand() * 4)
        if (k == 0) printf "-c\nwrite -P %d %d %d\n", 1 + i, o * 512, l * 512
        else if (k == 1) printf "-c\ndiscard %d %d\n", o * 512, l * 512
        else if (k == 2) printf "-c\nwrite -z %d %d\n", o * 512, l * 512
        else printf "-c\nwrite -z -u %d %d\n", o * 512, l * 512
    }
    # last: one whole object deallocated, one zeroed and kept
    printf "-c\nwrite -z -u 50331648 4194304\n-c\nwrite -z 54525952 4194304\n" }' > "$T/zops"
mapfile -t zops < "$T/zops"
check "random discards and zero writes on a local shadow" qemu-io -f raw -d unmap "${zops[@]}" "$T/zshadow"
check "the same through vdiskd's NBD export of the rbd image" qemu-io -f raw -d unmap "${zops[@]}" "$ZN"
check "the rbd export reads as the shadow" qemu-img compare -f raw -F raw "$T/zshadow" "$ZN"
map=$(nbdinfo --map=base:allocation "$ZN" 2>&1)
if awk '$1 <= 50331648 && $1 + $2 >= 54525952 && $4 ~ /hole/ {h=1}
        $1 <= 54525952 && $1 + $2 >= 58720256 && $4 == "data" {d=1} END {exit !(h && d)}' <<<"$map"; then
    ok "zeroes with leave to unmap deallocate; without it the object stays"
else
    fail "zeroes with leave to unmap deallocate; without it the object stays" "$(tr '\n' ' ' <<<"$map")"
fi

# A discard the cluster cannot answer (OSD stopped) holds neither the loop
# nor the other export on it: the local export keeps serving meanwhile.
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 60 qemu-io -f raw -d unmap -c 'discard 0 64M' -c 'write -z 0 64k' "$ZN" > "$T/zd.out" 2>&1 &
zd=$!
sleep 1
t0=$(date +%s%N)
out=$(timeout 20 qemu-io -f raw -c 'write -P 5 0 1M' -c 'read -P 5 0 1M' "nbd+unix:///loc?socket=$T/z.sock" 2>&1); rc=$?
el=$(( ($(date +%s%N) - t0) / 1000000 ))
kill -0 "$zd" 2>/dev/null && pending=yes || pending=no
kill -CONT "$osd"
wait "$zd"; zrc=$?
[ $rc -eq 0 ] && [ $pending = yes ] \
    && ok "during a stalled rbd discard the local export on the same loop answers (${el} ms)" \
    || fail "during a stalled rbd discard the local export on the same loop answers" "rc $rc after ${el} ms, discard pending: $pending: $out"
[ $zrc -eq 0 ] && ok "the stalled discard completes once the OSD is back" || fail "the stalled discard completes once the OSD is back" "rc $zrc: $(cat "$T/zd.out")"
check "and the image reads as zeros" timeout 60 qemu-io -f raw -c 'read -P 0 0 64M' "$ZN"
stop_vdiskd z

# ---- snapshots: read-only, the data as it was ----
rbdc snap create rbd/img@s1 > /dev/null 2>&1
check "write after the snapshot" $HELPER write "$(R img)" 31 200
check "convert from @snap" $VDISK convert -f raw -O raw "rbd:rbd/img@s1:conf=$CONF" "$T/snap.raw"
check "the snapshot holds the data of its time" qemu-img compare -f raw -F raw "$T/snap.raw" "rbd:rbd/img@s1:conf=$CONF"
out=$($VDISK convert -f raw -O raw "$(R img)" "$T/now.raw" 2>&1; cmp -s "$T/snap.raw" "$T/now.raw" && echo SAME)
grep -q SAME <<<"$out" && fail "the image moved on from its snapshot" "head and snapshot are equal" || ok "the image moved on from its snapshot"
check_fails "writing to a snapshot is refused" $HELPER write "rbd:rbd/img@s1:conf=$CONF" 1 1

# ---- vdiskd: vhost-user-blk export of an rbd image, to the front-end library ----
H=$VDISK_BUILD/tests/helpers
rbdc create rbd/vh --size 64M
start_vdiskd v --nbd "unix:$T/v-nbd.sock" --log-level=warning \
    --export "type=vhost-user-blk,name=vh,file=$(R vh),format=raw,socket=$T/vh.sock,num-queues=2" || exit 1
for _ in $(seq 100); do [ -S "$T/vh.sock" ] && break; sleep 0.05; done
check "vhost-user-blk on an rbd image: every request type, data verified" \
    "$H/vhost_io" --queues 2 --qd 8 --bs 64K --seed 21 --expect "$T/vh.expect" "$T/vh.sock"
check "qemu-img (rbd driver) sees what the vhost front-end wrote" qemu-img compare -f raw -F raw "$T/vh.expect" "$(R vh)"
check "vhost-user-blk on an rbd image: 4 KiB at QD32 written, then verified" \
    bash -c "'$H/vhost_io' --mode fill --queues 1 --qd 32 --bs 4K --size 16M --seed 22 '$T/vh.sock' && '$H/vhost_io' --mode verify --queues 1 --qd 32 --bs 4K --size 16M --seed 22 '$T/vh.sock'"
stop_vdiskd v

# an image without the exclusive-lock feature: RBD's advisory lock instead
check "create an image with layering only" $VDISK create -f raw "$(R old rbd_default_features=1)" 16M
grep -q "exclusive-lock" <<<"$(rbdc info rbd/old 2>/dev/null)" && fail "image lacks exclusive-lock" || ok "image lacks exclusive-lock"
mkfifo "$T/hold2.in"
$HELPER hold "$(R old)" < "$T/hold2.in" > "$T/hold2.out" 2>&1 &
holder2=$!
exec 8> "$T/hold2.in"
on_exit "exec 8>&-; kill $holder2 2>/dev/null"
for _ in $(seq 100); do grep -q open "$T/hold2.out" && break; sleep 0.1; done
grep -q "vdisk" <<<"$(rbdc lock ls rbd/old 2>/dev/null)" && ok "the writer holds an advisory lock" || fail "the writer holds an advisory lock" "$(rbdc lock ls rbd/old 2>&1)"
out=$($HELPER write "$(R old)" 8 1 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "advisory lock .* held by client" <<<"$out" && grep -q "rbd lock rm" <<<"$out" \
    && ok "a second writer is refused, told how to clear a dead owner's lock" || fail "a second writer is refused (advisory lock)" "rc $rc: $out"
exec 8>&-; wait $holder2
[ -z "$(rbdc lock ls rbd/old 2>/dev/null)" ] && ok "the advisory lock is released at close" || fail "the advisory lock is released at close" "$(rbdc lock ls rbd/old 2>&1)"
check "and the next writer gets it" $HELPER write "$(R old)" 9 10

# ---- errors: bounded in time, clear ----
# a loopback port nobody listens on (below the test clusters' range)
for dead in $(seq $((45000 + RANDOM % 900)) 45999); do [ -n "$(ss -Htln "sport = :$dead")" ] || break; done
sed -E "s/^mon host = .*/mon host = v2:127.0.0.1:$dead/" "$CONF" > "$T/dead.conf"
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
