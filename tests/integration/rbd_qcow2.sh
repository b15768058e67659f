#!/usr/bin/env bash
# qcow2 layered on a Ceph RBD image, exported by vdiskd over NBD: the
# format's discard, write-zeroes and flush (synchronous metadata I/O, a
# network round trip each on RBD) run off the event loop (block/request.c,
# "the gate"), so one connection's discards and zero writes never stop the
# loop from answering another, and the result is a clean qcow2.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"
source "$VDISK_ROOT/tests/helpers/rbd_common.bash"

rbdq_cleanup() {
    local p
    for p in ${q_pid:-} ${q2_pid:-} ${rd_pid:-} ${st_pid:-} ${rm_pid:-} ${wm_pid:-} ${dm_pid:-}; do kill -9 "$p" 2>/dev/null; done
    [ -n "${osd:-}" ] && kill -CONT "$osd" 2>/dev/null
    "$CLUSTER" stop "$T/ceph" > /dev/null 2>&1
}
on_exit rbdq_cleanup
rbd_cluster_up
# probe_local N: while the OSD is stopped, write and read back 1 MiB of
# pattern N on the local export of the same loop; sets rc, el (ms), out.
probe_local() {
    local t0
    t0=$(date +%s%N)
    out=$(timeout 20 qemu-io -f raw -c "write -P $1 0 1M" -c "read -P $1 0 1M" "$LN" 2>&1); rc=$?
    el=$(( ($(date +%s%N) - t0) / 1000000 ))
}
MiB=1048576

# 64 MiB: random data in the first half (the zone the writer churns), a
# pattern in the second half (the zone the reader verifies).
rand_file "$T/half" 32 11
{ cat "$T/half"; head -c $((32 * MiB)) /dev/zero | tr '\0' '\132'; } > "$T/src.raw"
cp "$T/src.raw" "$T/shadow.raw"
truncate -s 16M "$T/local.raw"
check "convert raw -> qcow2 on rbd" $VDISK convert -f raw -O qcow2 "$T/src.raw" "$(R qz)"

# one loop thread: the qcow2-on-rbd export and a local one share it
start_vdiskd q --nbd "unix:$T/q.sock" --threads 1 --log-level=error \
    --export "name=q,file=$(R qz),format=qcow2" --export "name=loc,file=$T/local.raw,format=raw" || exit 1
QN="nbd+unix:///q?socket=$T/q.sock"
LN="nbd+unix:///loc?socket=$T/q.sock"

# The writer's mix: writes, discards, zero writes with and without leave to
# unmap, in 512-byte units, all inside the first 32 MiB, with flushes.
# Discards cover whole 64 KiB clusters: qcow2 drops only those (a discard
# is advisory; what partly covered clusters read afterwards is unspecified).
awk 'BEGIN { srand(91); M = 65536
    for (i = 0; i < 120; i++) {
        o = int(rand() * M); l = 1 + int(rand() * (rand() < 0.5 ? 64 : 8192)); if (o + l > M) l = M - o
        k = int(rand() * 5)
        if (k == 1) { o = int(o / 128) * 128; l = (1 + int(l / 128)) * 128; if (o + l > M) l = M - o }
        if (k == 0) printf "-c\nwrite -P %d %d %d\n", 1 + i % 250, o * 512, l * 512
        else if (k == 1) printf "-c\ndiscard %d %d\n", o * 512, l * 512
        else if (k == 2) printf "-c\nwrite -z %d %d\n", o * 512, l * 512
        else if (k == 3) printf "-c\nwrite -z -u %d %d\n", o * 512, l * 512
        else printf "-c\nflush\n"
    } }' > "$T/ops"
mapfile -t ops < "$T/ops"
check "the mix on a local shadow" qemu-io -f raw -d unmap "${ops[@]}" "$T/shadow.raw"

# the reader: the pattern half, over and over, on its own connection
reader() {
    local n=0
    while [ ! -e "$T/stop" ]; do
        qemu-io -f raw -c "read -P 0x5a $((32 * MiB)) $((32 * MiB))" "$QN" > "$T/rd.last" 2>&1 || { echo "FAIL $n"; cat "$T/rd.last"; return 1; }
        n=$((n + 1))
    done
    echo "READS $n"
}
reader > "$T/rd.out" 2>&1 &
rd_pid=$!
out=$(qemu-io -f raw -d unmap "${ops[@]}" "$QN" 2>&1); rc=$?
# a few more rounds of the reader after the writer is done, then stop it
sleep 0.5; touch "$T/stop"; wait "$rd_pid"; rrc=$?; rd_pid=
[ $rc -eq 0 ] && ok "the mix through NBD on qcow2 on rbd" || fail "the mix through NBD on qcow2 on rbd" "$(tail -3 <<<"$out")"
nreads=$(awk '/^READS/ { print $2 }' "$T/rd.out")
[ $rrc -eq 0 ] && [ "${nreads:-0}" -ge 1 ] \
    && ok "meanwhile another connection's reads are answered and verified ($nreads rounds of 32 MiB)" \
    || fail "another connection's reads during the mix" "rc $rrc: $(tr '\n' ' ' < "$T/rd.out")"
check "the export reads as the shadow" qemu-img compare -f raw -F raw "$T/shadow.raw" "$QN"

# A metadata op the cluster cannot answer (OSD stopped): the flush after a
# discard writes L2 and refcount tables to RBD and stalls on its worker; the
# loop meanwhile answers the local export, and a read of the qcow2 export
# issued during the stall completes, with the right data, once it is over.
check "write fresh data to discard" qemu-io -f raw -c 'write -P 0x33 0 4M' -c flush "$QN"
qemu-io -f raw -c 'write -P 0x33 0 4M' "$T/shadow.raw" > /dev/null
qemu-io -f raw -d unmap -c 'discard 0 4M' "$T/shadow.raw" > /dev/null
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 60 qemu-io -f raw -d unmap -c 'discard 0 4M' -c 'flush' "$QN" > "$T/st.out" 2>&1 &
st_pid=$!
sleep 1
timeout 60 qemu-io -f raw -c "read -P 0x5a $((40 * MiB)) 1M" "$QN" > "$T/rq.out" 2>&1 &
rq=$!
sleep 0.5
probe_local 5
kill -0 "$st_pid" 2>/dev/null && pending=yes || pending=no
kill -CONT "$osd"; osd=
wait "$st_pid"; strc=$?; st_pid=
wait "$rq"; rqrc=$?
# (librbd may acknowledge the table writes from its cache; when the whole
# flush got through before the check, the fresh daemon below still proves it)
if [ $rc -eq 0 ] && [ $pending = yes ]; then
    ok "during a stalled qcow2 flush on rbd the local export on the same loop answers (${el} ms)"
elif [ $rc -eq 0 ]; then
    # not counted either way: the fresh daemon below stalls what must wait
    echo "# the flush was done before the check (librbd acknowledged it from its cache)"
else
    fail "during a stalled qcow2 flush on rbd the local export on the same loop answers" "rc $rc after ${el} ms, flush pending: $pending: $out"
fi
[ $strc -eq 0 ] && ok "the stalled discard and flush complete once the OSD is back" || fail "the stalled discard and flush complete once the OSD is back" "rc $strc: $(cat "$T/st.out")"
[ $rqrc -eq 0 ] && ok "a read queued behind them completes with the right data" || fail "a read queued behind them completes with the right data" "rc $rqrc: $(cat "$T/rq.out")"
check "the export still reads as the shadow" qemu-img compare -f raw -F raw "$T/shadow.raw" "$QN"
stop_vdiskd q

# A fresh daemon has no L2 table cached: with the OSD stopped, a read must
# load one (the format's map, on a worker) and an allocating write must
# place a cluster; the local export on the same loop answers meanwhile.
start_vdiskd q2 --nbd "unix:$T/q2.sock" --threads 1 --log-level=error \
    --export "name=q,file=$(R qz),format=qcow2" --export "name=loc,file=$T/local.raw,format=raw" || exit 1
QN="nbd+unix:///q?socket=$T/q2.sock"
LN="nbd+unix:///loc?socket=$T/q2.sock"
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 60 qemu-io -f raw -c "read -P 0x5a $((48 * MiB)) 64k" "$QN" > "$T/rm.out" 2>&1 &
rm_pid=$!
timeout 60 qemu-io -f raw -c "write -P 0x44 $((60 * MiB)) 192k" "$QN" > "$T/wm.out" 2>&1 &
wm_pid=$!
timeout 60 qemu-io -f raw -d unmap -c "discard $((56 * MiB)) 1M" -c flush "$QN" > "$T/dm.out" 2>&1 &
dm_pid=$!
sleep 1
probe_local 6
kill -0 "$rm_pid" 2>/dev/null && pending=yes || pending=no
kill -0 "$dm_pid" 2>/dev/null && dpending=yes || dpending=no
kill -CONT "$osd"; osd=
wait "$rm_pid"; rmrc=$?
wait "$wm_pid"; wmrc=$?
wait "$dm_pid"; dmrc=$?
[ $rc -eq 0 ] && [ $pending = yes ] && [ $dpending = yes ] \
    && ok "during a stalled L2 load, allocation, discard and flush the local export on the same loop answers (${el} ms)" \
    || fail "during a stalled L2 load, allocation, discard and flush the local export on the same loop answers" "rc $rc after ${el} ms, read pending: $pending, discard pending: $dpending: $out"
[ $rmrc -eq 0 ] && [ $wmrc -eq 0 ] && [ $dmrc -eq 0 ] && ok "the stalled read, write, discard and flush complete, data verified, once the OSD is back" \
    || fail "the stalled read, write, discard and flush complete once the OSD is back" "rc $rmrc $wmrc $dmrc: $(cat "$T/rm.out" "$T/wm.out" "$T/dm.out")"
qemu-io -f raw -c "write -P 0x44 $((60 * MiB)) 192k" "$T/shadow.raw" > /dev/null
qemu-io -f raw -d unmap -c "discard $((56 * MiB)) 1M" "$T/shadow.raw" > /dev/null
check "the export reads as the shadow after that" qemu-img compare -f raw -F raw "$T/shadow.raw" "$QN"
stop_vdiskd q2

check "qemu-img check (its rbd driver): the qcow2 on rbd is clean" qemu-img check -f qcow2 "$(R qz)"
check "convert it back to a local qcow2" $VDISK convert -O qcow2 "$(R qz)" "$T/back.qcow2"
check "qemu-img check: the converted qcow2 is clean" qemu-img check -f qcow2 "$T/back.qcow2"
check "and it reads as the shadow" qemu-img compare -f raw -F qcow2 "$T/shadow.raw" "$T/back.qcow2"
