#!/usr/bin/env bash
# Cache modes as the kernel sees them (strace counts fsync / fdatasync /
# sync_file_range and RWF_DSYNC writes; the thread-pool engine makes the
# engine's syncs system calls too):
#   convert (default)  no syncs while copying, then exactly the final ones
#                      (the target's data, and its folder when created)
#   convert -t unsafe  none at all (qemu-img's default)
#   convert -t writeback  syncs while copying and at the end
#   vdiskd cache=unsafe   NBD flushes acknowledged without a sync
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"
export VDISK_AIO=threads

# syncs LOG: how many sync calls the trace holds (a sync_file_range that
# only starts write-back, SYNC_FILE_RANGE_WRITE alone, is not one: kicks)
syncs() {
    grep -E '^[0-9]+ +(fsync|fdatasync|sync_file_range)\(|pwritev2\(.*RWF_(D)?SYNC' "$1" |
        grep -cvE 'sync_file_range\(.*, SYNC_FILE_RANGE_WRITE\)'
}
kicks() {
    grep -cE '^[0-9]+ +sync_file_range\(.*, SYNC_FILE_RANGE_WRITE\)' "$1"
}
# traced LOG CMD...: run CMD under strace (LeakSanitizer cannot run under
# ptrace; the other checks stay on), its status
traced() {
    local log=$1; shift
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
        strace -f -qq -o "$log" -e trace=fsync,fdatasync,sync_file_range,pwritev2 "$@"
}

# 24 MiB of data with holes; early write-back / flushes every 4 MiB
# (the interval is 64 MiB unless VDISK_CONVERT_FLUSH_MB says otherwise)
export VDISK_CONVERT_FLUSH_MB=4
truncate -s 48M "$T/src.raw"
rand_file "$T/blob" 8 cache1
for at in 0 20 40; do dd if="$T/blob" of="$T/src.raw" bs=1M seek=$at conv=notrunc status=none; done

check "convert (default)" traced "$T/def.log" "$VDISK" convert -f raw -O raw "$T/src.raw" "$T/def.raw"
n=$(syncs "$T/def.log")
fd=$(grep -cE '^[0-9]+ +fdatasync\(' "$T/def.log"); fs=$(grep -cE '^[0-9]+ +fsync\(' "$T/def.log")
[ "$n" = 2 ] && [ "$fd" = 1 ] && [ "$fs" = 1 ] && ok "convert: exactly the final syncs (target data, its folder)" \
    || fail "convert: exactly the final syncs (target data, its folder)" "$n syncs: $(grep -E 'sync|DSYNC' "$T/def.log" | tr '\n' ' ')"
cmp -s "$T/src.raw" "$T/def.raw" && ok "convert: the copy is right" || fail "convert: the copy is right"
[ "$(kicks "$T/def.log")" -ge 1 ] && ok "convert: write-back started while copying ($(kicks "$T/def.log"))" \
    || fail "convert: write-back started while copying"

check "convert -t unsafe" traced "$T/un.log" "$VDISK" convert -f raw -O raw -t unsafe "$T/src.raw" "$T/un.raw"
n=$(syncs "$T/un.log")
[ "$n" = 0 ] && [ "$(kicks "$T/un.log")" = 0 ] && ok "convert -t unsafe: no sync at all" || fail "convert -t unsafe: no sync at all" "$n: $(grep -E 'sync' "$T/un.log" | head -3 | tr '\n' ' ')"
cmp -s "$T/src.raw" "$T/un.raw" && ok "convert -t unsafe: the copy is right" || fail "convert -t unsafe: the copy is right"

check "convert -t writeback" traced "$T/wb.log" "$VDISK" convert -f raw -O raw -t writeback "$T/src.raw" "$T/wb.raw"
n=$(syncs "$T/wb.log")
[ "$n" -ge 2 ] && ok "convert -t writeback: syncs while copying and at the end ($n)" \
    || fail "convert -t writeback: syncs while copying and at the end" "$n"
cmp -s "$T/src.raw" "$T/wb.raw" && ok "convert -t writeback: the copy is right" || fail "convert -t writeback: the copy is right"

check "convert -n" traced "$T/n.log" "$VDISK" convert -n -f raw -O raw "$T/src.raw" "$T/un.raw"
n=$(syncs "$T/n.log")
[ "$n" = 1 ] && ok "convert -n: one final sync (no folder sync: nothing created)" || fail "convert -n: one final sync" "$n"

# qcow2 target: the default skips every metadata-ordering sync and
# RWF_DSYNC write of the copy; writeback keeps them.
traced "$T/qun.log" "$VDISK" convert -f raw -O qcow2 -t unsafe "$T/src.raw" "$T/un.qcow2" &&
    traced "$T/qdef.log" "$VDISK" convert -f raw -O qcow2 "$T/src.raw" "$T/def.qcow2" &&
    traced "$T/qwb.log" "$VDISK" convert -f raw -O qcow2 -t writeback "$T/src.raw" "$T/wb.qcow2" \
    && ok "convert -O qcow2 in three modes" || fail "convert -O qcow2 in three modes"
qu=$(syncs "$T/qun.log"); qd=$(syncs "$T/qdef.log"); qw=$(syncs "$T/qwb.log")
dsync=$(grep -c 'RWF_DSYNC' "$T/qun.log")
[ "$dsync" = 0 ] && ok "qcow2 -t unsafe: no RWF_DSYNC writes" || fail "qcow2 -t unsafe: no RWF_DSYNC writes" "$dsync"
# what -t unsafe still does is image creation's own; the default adds only
# the final ones (a close's flush: tables, then data, then the folder)
[ "$qd" -gt "$qu" ] && [ "$qd" -le $((qu + 6)) ] && ok "qcow2 default: creation's syncs plus the final ones ($qu + $((qd - qu)))" \
    || fail "qcow2 default: creation's syncs plus the final ones" "unsafe $qu, default $qd"
[ "$qw" -gt "$qu" ] && ok "qcow2 -t writeback: syncs kept ($qw > $qu)" || fail "qcow2 -t writeback: syncs kept" "writeback $qw, unsafe $qu"
for f in un def wb; do
    check "qcow2 -t ${f}: qemu-img check" qemu-img check -q "$T/$f.qcow2"
    check "qcow2 -t ${f}: qemu-img compare" qemu-img compare -q -f raw -F qcow2 "$T/src.raw" "$T/$f.qcow2"
done

# io and the cache option spellings
for m in none writeback writethrough directsync unsafe; do
    check "io -t $m" "$VDISK" io -f raw -t "$m" -c "write -P 0x33 0 64k" -c "read -P 0x33 0 64k" -c flush "$T/un.raw"
done
check_fails "io -t bogus" "$VDISK" io -f raw -t bogus -c flush "$T/un.raw"
check_fails "convert -t bogus" "$VDISK" convert -f raw -t bogus "$T/src.raw" "$T/bogus.raw"
check "io -t unsafe, FUA writes" traced "$T/io.log" "$VDISK" io -f raw -t unsafe -c "write -f 0 64k" -c flush -c "write -f 64k 64k" "$T/un.raw"
[ "$(syncs "$T/io.log")" = 0 ] && ok "io -t unsafe: FUA and flush do not sync" || fail "io -t unsafe: FUA and flush do not sync" "$(syncs "$T/io.log")"
check "io -t writethrough" traced "$T/iow.log" "$VDISK" io -f raw -t writethrough -c "write 0 4k" -c "write 4k 4k" \
    -c "write 8k 4k" "$T/un.raw"
[ "$(syncs "$T/iow.log")" -ge 3 ] && ok "io -t writethrough: every write synced" || fail "io -t writethrough: every write synced" "$(syncs "$T/iow.log")"

# vdiskd: cache=unsafe acknowledges NBD flushes without syncing
cat > "$T/vdiskd-traced" <<EOF
#!/bin/sh
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 exec strace -f -qq -o "$T/d.\$\$.log" -e trace=fsync,fdatasync,sync_file_range,pwritev2 "$VDISKD" "\$@"
EOF
chmod +x "$T/vdiskd-traced"
for mode in unsafe writeback; do
    S=$T/$mode.sock
    truncate -s 16M "$T/exp-$mode.raw"
    VDISKD=$T/vdiskd-traced start_vdiskd "d$mode" --nbd "unix:$S" \
        --export "name=disk,file=$T/exp-$mode.raw,format=raw,cache=$mode" || { fail "vdiskd cache=$mode starts"; continue; }
    nbdsh -u "nbd+unix:///disk?socket=$S" \
        -c 'h.pwrite(b"\x5a" * 65536, 0)' -c 'h.flush()' -c 'h.pwrite(b"\x5a" * 4096, 1 << 20, nbd.CMD_FLAG_FUA)' \
        -c 'h.flush()' -c 'assert h.pread(4096, 1 << 20) == b"\x5a" * 4096' \
        && ok "vdiskd cache=$mode: writes, flushes and FUA succeed" || fail "vdiskd cache=$mode: writes, flushes and FUA succeed"
    pid=$(cat "$T/d$mode.pid")
    kill -TERM "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    wait "$(eval echo "\${d${mode}_pid}")" 2>/dev/null
    log=$(ls "$T"/d.*.log | head -1)
    n=$(syncs "$log")
    if [ "$mode" = unsafe ]; then
        [ "$n" = 0 ] && ok "vdiskd cache=unsafe: no sync" || fail "vdiskd cache=unsafe: no sync" "$n"
    else
        [ "$n" -ge 2 ] && ok "vdiskd cache=writeback: flushes sync ($n)" || fail "vdiskd cache=writeback: flushes sync" "$n"
    fi
    rm -f "$log"
    [ "$(od -An -tx1 -j $((1 << 20)) -N1 "$T/exp-$mode.raw" | tr -d ' ')" = 5a ] \
        && ok "vdiskd cache=$mode: the data is in the file" || fail "vdiskd cache=$mode: the data is in the file"
done
