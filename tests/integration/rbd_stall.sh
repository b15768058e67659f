#!/usr/bin/env bash
# Block status and resize of a qcow2 on a Ceph RBD image, exported by
# vdiskd, while the cluster does not answer (the OSD stopped with SIGSTOP):
# the format's table reads and writes run on the worker pool (block/request.c,
# vd_disk_block_status_async / vd_disk_resize_async), so they never hold the
# event loop that a local export shares with them, nor the main loop that
# accepts connections and runs the control socket. Once the OSD is back the
# stalled calls complete with the right answers.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"
source "$VDISK_ROOT/tests/helpers/rbd_common.bash"

stall_cleanup() {
    local p
    for p in ${bs_pid:-} ${br_pid:-} ${bd_pid:-} ${rs_pid:-}; do kill -9 "$p" 2>/dev/null; done
    [ -n "${osd:-}" ] && kill -CONT "$osd" 2>/dev/null
    "$CLUSTER" stop "$T/ceph" > /dev/null 2>&1
}
on_exit stall_cleanup
rbd_cluster_up
MiB=1048576
G=1073741824

# probe_local N: a new connection to the local export writes and reads back
# 1 MiB of pattern N; sets rc, el (ms), out. A hang detector, not a timing.
probe_local() {
    local t0
    t0=$(date +%s%N)
    out=$(timeout 10 qemu-io -f raw -c "write -P $1 0 1M" -c "read -P $1 0 1M" "$LN" 2>&1); rc=$?
    el=$(( ($(date +%s%N) - t0) / 1000000 ))
}

# same_map NBD_JSON QEMU_JSON [depth]: nbdinfo --map --json (base:allocation)
# and qemu-img map --output=json agree once both are runs of (hole, zero);
# with depth, qemu:allocation-depth (1 where present, 0 elsewhere: no
# backing file) against qemu-img's "present".
same_map() {
    "$PY" - "$1" "$2" "${3:-}" <<'PYEOF'
import json, sys
def runs(items):
    out = []
    for start, length, hole, zero in items:
        if length and out and out[-1][1] == start and out[-1][2:] == [hole, zero]:
            out[-1][1] = start + length
        elif length:
            out.append([start, start + length, hole, zero])
    return out
if sys.argv[3]:
    a = runs((e["offset"], e["length"], e["type"], 0) for e in json.load(open(sys.argv[1])))
    b = runs((e["start"], e["length"], int(e["present"]), 0) for e in json.load(open(sys.argv[2])))
else:
    a = runs((e["offset"], e["length"], bool(e["type"] & 1), bool(e["type"] & 2)) for e in json.load(open(sys.argv[1])))
    b = runs((e["start"], e["length"], not e["data"], bool(e["zero"])) for e in json.load(open(sys.argv[2])))
if a != b:
    print("nbd:", a[:6], "qemu-img:", b[:6])
    sys.exit(1)
PYEOF
}

# A 6 GiB qcow2 with data in each 512 MiB stretch (one L2 table each), zero
# clusters and a hole: its block status needs every L2 table. On RBD, and a
# raw RBD image with data in two places beside it.
qemu-img create -q -f qcow2 "$T/src.qcow2" 6G
args=()
for g in 0 1 2 3 4 5; do
    args+=(-c "write -P $((g + 1)) $((g * 1024 + 3))M 192k" -c "write -z $((g * 1024 + 600))M 128k")
done
qemu-io -f qcow2 "${args[@]}" "$T/src.qcow2" > /dev/null
check "convert the qcow2 to a qcow2 on rbd" $VDISK convert -f qcow2 -O qcow2 "$T/src.qcow2" "$(R qz)"
check "qemu-img map (its rbd driver) of the qcow2 on rbd" \
    sh -c "qemu-img map -f qcow2 --output=json '$(R qz)' > '$T/qz.qemu.json'"
qemu-img create -q -f raw "$T/r.raw" 256M
qemu-io -f raw -c "write -P 7 8M 4M" -c "write -P 8 200M 1M" "$T/r.raw" > /dev/null
check "convert a raw image to rbd" $VDISK convert -f raw -O raw "$T/r.raw" "$(R rz)"
truncate -s 16M "$T/local.raw"
# the qcow2's length on rbd: closing trimmed the RBD image to it
size0=$(rbdc info rbd/qz --format json 2>/dev/null | jq -r .size)

# one loop thread: the RBD exports and a local one share it
start_vdiskd d --nbd "unix:$T/d.sock" --control "$T/ctl.sock" --threads 1 --log-level=error \
    --export "name=q,file=$(R qz),format=qcow2" --export "name=r,file=$(R rz),format=raw" \
    --export "name=loc,file=$T/local.raw,format=raw" || exit 1
QN="nbd+unix:///q?socket=$T/d.sock"
RN="nbd+unix:///r?socket=$T/d.sock"
LN="nbd+unix:///loc?socket=$T/d.sock"

# A fresh daemon has no L2 table cached and no allocation diff of the raw
# image: with the OSD stopped, both maps stall on their workers.
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 90 nbdinfo --map --json "$QN" > "$T/qz.nbd.json" 2> "$T/bs.err" &
bs_pid=$!
timeout 90 nbdinfo --map --json "$RN" > "$T/rz.nbd.json" 2> "$T/br.err" &
br_pid=$!
timeout 90 nbdinfo --map=qemu:allocation-depth --json "$QN" > "$T/qd.nbd.json" 2> "$T/bd.err" &
bd_pid=$!
sleep 1
probe_local 5
kill -0 "$bs_pid" 2>/dev/null && pending=yes || pending=no
kill -0 "$br_pid" 2>/dev/null && rpending=yes || rpending=no
kill -0 "$bd_pid" 2>/dev/null && dpending=yes || dpending=no
kill -CONT "$osd"; osd=
wait "$bs_pid"; bsrc=$?; bs_pid=
wait "$br_pid"; brrc=$?; br_pid=
wait "$bd_pid"; bdrc=$?; bd_pid=
[ $rc -eq 0 ] && [ $pending = yes ] && [ $rpending = yes ] && [ $dpending = yes ] \
    && ok "during stalled block status of qcow2 and raw on rbd the local export on the same loop answers (${el} ms)" \
    || fail "during stalled block status the local export on the same loop answers" \
            "rc $rc after ${el} ms, pending: qcow2 map $pending, raw map $rpending, depth map $dpending: $out"
[ $bsrc -eq 0 ] && same_map "$T/qz.nbd.json" "$T/qz.qemu.json" > "$T/cmp.out" 2>&1 \
    && ok "the stalled qcow2 map completes once the OSD is back, equal to qemu-img map" \
    || fail "the stalled qcow2 map completes, equal to qemu-img map" "rc $bsrc: $(cat "$T/bs.err" "$T/cmp.out")"
[ $bdrc -eq 0 ] && same_map "$T/qd.nbd.json" "$T/qz.qemu.json" depth > "$T/cmp.out" 2>&1 \
    && ok "the stalled qemu:allocation-depth map completes, equal to qemu-img map's present" \
    || fail "the stalled allocation-depth map completes, equal to qemu-img map" "rc $bdrc: $(cat "$T/bd.err" "$T/cmp.out")"
$VDISK map --output=json "$(R rz)" > "$T/rz.vdisk.json" 2>&1
[ $brrc -eq 0 ] && same_map "$T/rz.nbd.json" "$T/rz.vdisk.json" > "$T/cmp.out" 2>&1 \
    && grep -q '"offset": *8388608' "$T/rz.nbd.json" \
    && ok "the stalled raw map completes once the OSD is back, equal to vdisk map" \
    || fail "the stalled raw map completes, equal to vdisk map" "rc $brrc: $(cat "$T/br.err" "$T/cmp.out")"

# A write that grows the RBD image (rbd_resize, a cluster round trip) while
# the OSD is stopped. vdiskd grows the image ahead in steps of 64 MiB (4 MiB
# aligned) from its length at open, and qcow2 appends a 64 KiB cluster per
# fresh one: fill the first step with the OSD running (the L2 table and the
# refcount block are then cached), then the next fresh cluster needs the
# image grown, which stalls on a worker, not on the loop.
C=65536
gap=$(( (size0 + 64 * MiB + 4 * MiB - 1) / (4 * MiB) * (4 * MiB) - size0 ))
check "fill the first growth step of the qcow2 on rbd ($((gap / C)) fresh clusters)" \
    qemu-io -f raw -c "write -P 4 $((64 * MiB)) $(( gap / C * C ))" "$QN"
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 90 qemu-io -f raw -c "write -P 5 $((64 * MiB + gap / C * C)) $C" "$QN" > "$T/gw.out" 2>&1 &
rs_pid=$!
sleep 1
probe_local 9
kill -0 "$rs_pid" 2>/dev/null && pending=yes || pending=no
kill -CONT "$osd"; osd=
wait "$rs_pid"; rsrc=$?; rs_pid=
[ $rc -eq 0 ] && [ $pending = yes ] \
    && ok "during a stalled growth of the rbd image under a write the local export on the same loop answers (${el} ms)" \
    || fail "during a stalled growth of the rbd image the local export on the same loop answers" \
            "rc $rc after ${el} ms, write pending: $pending: $out"
[ $rsrc -eq 0 ] && check "the write completes once the OSD is back, data verified" \
    qemu-io -f raw -c "read -P 4 $((64 * MiB)) $(( gap / C * C ))" -c "read -P 5 $((64 * MiB + gap / C * C)) $C" "$QN" \
    || fail "the write that grows the image completes" "rc $rsrc: $(cat "$T/gw.out")"

# Many fresh clusters at once (QD32 over two connections) across growth
# steps: the writes that need the image grown wait for one grow on a
# worker, then go on; every byte verified.
out=$(timeout 120 fio --name=grow --ioengine=nbd --uri="$QN" --rw=randwrite --bs=64k --iodepth=32 \
    --numjobs=2 --offset=$((G + 64 * MiB)) --size=80M --offset_increment=80M --verify=crc32c \
    --do_verify=1 --verify_fatal=1 --verify_state_save=0 --randrepeat=0 --group_reporting \
    --output-format=terse 2>&1)
[ $? -eq 0 ] && ! grep -qi 'verify.*fail\|bad magic\|crc32c.*wanted' <<<"$out" \
    && ok "fio: 160 MiB of fresh qcow2 clusters on rbd at QD32 x 2, growing the image, verified" \
    || fail "fio: fresh qcow2 clusters on rbd at QD32 x 2, verified" "$(tail -c 600 <<<"$out")"

# A resize of the qcow2 on rbd while the OSD is stopped: the format's table
# and header writes and the flush after them stall on a worker (through
# the gate: the export's requests wait for it), the control command on the
# control socket's command thread. Meanwhile the main loop still accepts
# connections (a new one to the local export is served) and answers
# another control client.
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 90 $VDISK ctl "$T/ctl.sock" block-resize "{\"name\": \"q\", \"size\": $((7 * G))}" > "$T/rs.out" 2>&1 &
rs_pid=$!
sleep 1
probe_local 6
qe=$(timeout 10 $VDISK ctl "$T/ctl.sock" query-exports 2>&1); qrc=$?
kill -0 "$rs_pid" 2>/dev/null && pending=yes || pending=no
kill -CONT "$osd"; osd=
wait "$rs_pid"; rsrc=$?; rs_pid=
[ $rc -eq 0 ] && [ $qrc -eq 0 ] && [ $pending = yes ] \
    && ok "during a stalled resize of the qcow2 on rbd a new connection to the local export and the control socket answer (${el} ms)" \
    || fail "during a stalled resize the local export and the control socket answer" \
            "rc $rc after ${el} ms, query-exports rc $qrc, resize pending: $pending: $out $qe"
size=$(timeout 20 nbdinfo --size "$QN" 2>&1)
[ $rsrc -eq 0 ] && [ "$size" = $((7 * G)) ] \
    && ok "the stalled resize completes once the OSD is back; nbdinfo sees 7 GiB" \
    || fail "the stalled resize completes; nbdinfo sees 7 GiB" "rc $rsrc, size $size: $(cat "$T/rs.out")"
timeout 30 nbdinfo --map --json "$QN" > "$T/qz7.nbd.json" 2>&1
"$PY" -c '
import json, sys
m = json.load(open(sys.argv[1]))
tail = [e for e in m if e["offset"] + e["length"] > 6 * 2**30]
sys.exit(0 if tail and all(e["type"] == 3 for e in tail) and m[-1]["offset"] + m[-1]["length"] == 7 * 2**30 else 1)
' "$T/qz7.nbd.json" && ok "block status of the grown part: a hole that reads as zeros" \
    || fail "block status of the grown part" "$(tail -c 300 "$T/qz7.nbd.json")"

# Removal while the OSD is stopped: unflushed qcow2 metadata (a new
# cluster's L2 entry and refcount) must reach the cluster in the final
# flush, which stalls on the command thread; the main loop serves on.
check "an allocating write to the qcow2 on rbd, not flushed" \
    nbdsh -u "$QN" -c 'h.pwrite(b"\x09" * 65536, 5 * 2**30 + 64 * 2**20)'
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 90 $VDISK ctl "$T/ctl.sock" export-del '{"name": "q"}' > "$T/del.out" 2>&1 &
rs_pid=$!
sleep 1
probe_local 7
qe=$(timeout 10 $VDISK ctl "$T/ctl.sock" query-exports 2>&1); qrc=$?
kill -0 "$rs_pid" 2>/dev/null && pending=yes || pending=no
kill -CONT "$osd"; osd=
wait "$rs_pid"; rsrc=$?; rs_pid=
[ $rc -eq 0 ] && [ $qrc -eq 0 ] && [ $pending = yes ] \
    && ok "during a stalled export-del (its final flush) a new connection to the local export and the control socket answer (${el} ms)" \
    || fail "during a stalled export-del the local export and the control socket answer" \
            "rc $rc after ${el} ms, query-exports rc $qrc, export-del pending: $pending: $out $qe"
[ $rsrc -eq 0 ] && ok "the stalled export-del completes once the OSD is back" \
    || fail "the stalled export-del completes" "rc $rsrc: $(cat "$T/del.out")"
check "qemu-img check (its rbd driver): the qcow2 on rbd is clean after removal" qemu-img check -f qcow2 "$(R qz)"
check "and holds the write made before the removal" \
    qemu-io -f qcow2 -r -c "read -P 9 $((5 * G + 64 * 1048576)) 64k" -c "read -P 6 $((5 * G + 3 * 1048576)) 192k" "$(R qz)"

# export-add of an image on the stopped cluster: its open (the image's
# header objects) stalls on the command thread, not on the main loop.
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
timeout 90 $VDISK ctl "$T/ctl.sock" export-add "{\"name\": \"q\", \"file\": \"$(R qz)\", \"format\": \"qcow2\"}" > "$T/add.out" 2>&1 &
rs_pid=$!
sleep 1
probe_local 8
qe=$(timeout 10 $VDISK ctl "$T/ctl.sock" query-exports 2>&1); qrc=$?
kill -0 "$rs_pid" 2>/dev/null && pending=yes || pending=no
kill -CONT "$osd"; osd=
wait "$rs_pid"; rsrc=$?; rs_pid=
[ $rc -eq 0 ] && [ $qrc -eq 0 ] && [ $pending = yes ] \
    && ok "during a stalled export-add a new connection to the local export and the control socket answer (${el} ms)" \
    || fail "during a stalled export-add the local export and the control socket answer" \
            "rc $rc after ${el} ms, query-exports rc $qrc, export-add pending: $pending: $out $qe"
[ $rsrc -eq 0 ] && ok "the stalled export-add completes once the OSD is back" \
    || fail "the stalled export-add completes" "rc $rsrc: $(cat "$T/add.out")"

# Shutdown (SIGTERM) with unflushed metadata and the OSD stopped: the final
# flush runs on the main thread once its loop has stopped and the
# connections are drained (nothing else waits on it then); vdiskd waits
# for the cluster, then exits cleanly, and nothing is lost.
check "another allocating write, not flushed" \
    nbdsh -u "$QN" -c 'h.pwrite(b"\x0a" * 65536, 4 * 2**30 + 64 * 2**20)'
osd=$(cat "$T/ceph/osd.pid")
kill -STOP "$osd"
kill -TERM "$d_pid"
sleep 1
kill -0 "$d_pid" 2>/dev/null && pending=yes || pending=no
kill -CONT "$osd"; osd=
wait "$d_pid"; drc=$?
[ $pending = yes ] && [ $drc -eq 0 ] && sanitizer_clean "$T/d.log" \
    && ok "SIGTERM during a stall: vdiskd waits for the final flush, then exits cleanly" \
    || fail "SIGTERM during a stall: vdiskd waits for the final flush, then exits cleanly" \
            "waiting: $pending, rc $drc: $(grep -m4 -E 'Sanitizer|runtime error|error' "$T/d.log" | tr '\n' ' ')"
check "qemu-img check: the qcow2 on rbd is clean after the shutdown" qemu-img check -f qcow2 "$(R qz)"
check "and holds the write made before it" \
    qemu-io -f qcow2 -r -c "read -P 10 $((4 * G + 64 * 1048576)) 64k" -c "read -P 9 $((5 * G + 64 * 1048576)) 64k" "$(R qz)"
