#!/usr/bin/env bash
# VHD write-zeroes, discard, resize and rebase -u, each checked against a
# raw shadow copy given the same operations, by vdisk and by qemu-img
# (compare, info), and parsed by libyal's vhdiinfo.
source "$(dirname "$0")/../lib.sh"

MiB=1048576
# same_as NAME IMG SHADOW: vdisk and qemu-img read IMG as SHADOW's bytes
same_as() {
    check "$1: vdisk reads the shadow's bytes" "$VDISK" compare -q -f vhd "$2" -F raw "$3"
    check "$1: qemu-img reads the shadow's bytes" qemu-img compare -q -f vpc "$2" -F raw "$3"
}
# QEMU 7.2 opens a differencing VHD without its parent (it reads zeros where
# the parent shows through), so chains are checked by vdisk alone.
same_chain() {
    check "$1: vdisk reads the shadow's bytes through the chain" "$VDISK" compare -q -f vhd "$2" -F raw "$3"
}
alloc_kib() { du -k "$1" | cut -f1; }
vsize() { qemu-img info --output=json -f vpc "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'; }
vhdi_size() { vhdiinfo "$1" | sed -n 's/.*Media size.*(\([0-9]*\) bytes).*/\1/p'; }
both() {   # both IMG SHADOW IO-ARGS...: the same vdisk io commands on the image and the shadow
    local img=$1 sh=$2; shift 2
    "$VDISK" io -f vhd "$@" "$img" >/dev/null && "$VDISK" io -f raw "$@" "$sh" >/dev/null
}

# ---- dynamic: write-zeroes ----
D=$T/d.vhd S=$T/d.raw
"$VDISK" create -q -f vhd -o force_size=on "$D" 64M
"$VDISK" create -q -f raw "$S" 64M
both "$D" "$S" -c "write -P 0xab 0 6M" -c "write -P 0xcd 20M 1M"
before=$(alloc_kib "$D")
check "dynamic: write-zeroes over unallocated blocks" both "$D" "$S" -c "write -z 30M 20M" -c "write -z -u 50M 14M"
after=$(alloc_kib "$D")
if [ "$after" -le "$before" ]; then ok "dynamic: zeroing unallocated blocks allocates nothing ($before -> $after KiB)"
else fail "dynamic: zeroing unallocated blocks allocates nothing" "$before -> $after KiB"; fi
check "dynamic: write-zeroes over allocated data (whole block, partial, unaligned)" both "$D" "$S" \
    -c "write -z 2M 2M" -c "write -z 4M 1M" -c "write -z 1000 3000" -c "write -z 20M 4k"
before=$after
check "dynamic: write-zeroes with unmap punches the data" both "$D" "$S" -c "write -z -u 0 1M"
after=$(alloc_kib "$D")
if [ "$after" -lt "$before" ]; then ok "dynamic: unmapped zeros give space back ($before -> $after KiB)"
else fail "dynamic: unmapped zeros give space back" "$before -> $after KiB"; fi
same_as "dynamic after write-zeroes" "$D" "$S"
check "dynamic: vdisk check" "$VDISK" check -q -f vhd "$D"

# ---- dynamic: discard reads zeros afterwards ----
check "dynamic: discard" both "$D" "$S" -c "discard 5M 1M" -c "discard 20M 2M"
same_as "dynamic after discard" "$D" "$S"

# ---- dynamic: resize ----
check "dynamic: grow within the BAT" "$VDISK" resize -q -f vhd "$D" 100M
"$VDISK" resize -q -f raw "$S" 100M
[ "$(vsize "$D")" = $((100 * MiB)) ] && ok "dynamic: qemu-img sees the new size" || fail "dynamic: qemu-img sees the new size" "$(vsize "$D")"
[ "$(vhdi_size "$D")" = $((100 * MiB)) ] && ok "dynamic: vhdiinfo sees the new size" || fail "dynamic: vhdiinfo sees the new size" "$(vhdi_size "$D")"
both "$D" "$S" -c "write -P 0x77 90M 3M"
same_as "dynamic after growing" "$D" "$S"
check_fails "dynamic: growing past the BAT's room is refused" "$VDISK" resize -q -f vhd "$D" 1G
check_fails "dynamic: shrinking over an allocated block is refused" "$VDISK" resize -q -f vhd --shrink "$D" 10M
check_fails "dynamic: a size that is no whole sector is refused" "$VDISK" resize -q -f vhd "$D" 104858000
check "dynamic: shrink over unallocated blocks" "$VDISK" resize -q -f vhd --shrink "$D" 93M
"$VDISK" resize -q -f raw --shrink "$S" 93M
same_as "dynamic after shrinking" "$D" "$S"
# growing again: the cut-off part of the last block reads as zeros
"$VDISK" resize -q -f vhd "$D" 96M && "$VDISK" resize -q -f raw "$S" 96M
same_as "dynamic shrunk then grown" "$D" "$S"
vhdiinfo "$D" > "$T/vhdi.txt" 2>&1 && grep -q "Dynamic" "$T/vhdi.txt" && ok "dynamic: vhdiinfo parses it" || fail "dynamic: vhdiinfo parses it" "$(tail -3 "$T/vhdi.txt")"

# ---- fixed ----
F=$T/f.vhd S=$T/f.raw
"$VDISK" create -q -f vhd -o subformat=fixed,force_size=on "$F" 16M
"$VDISK" create -q -f raw "$S" 16M
both "$F" "$S" -c "write -P 0x5a 0 16M"
check "fixed: write-zeroes and discard" both "$F" "$S" -c "write -z 1M 1M" -c "write -z -u 3M 2M" -c "discard 8M 1M"
same_as "fixed after zeroes" "$F" "$S"
check "fixed: grow" "$VDISK" resize -q -f vhd "$F" 24M
"$VDISK" resize -q -f raw "$S" 24M
same_as "fixed after growing" "$F" "$S"
[ "$(vhdi_size "$F")" = $((24 * MiB)) ] && ok "fixed: vhdiinfo sees the new size" || fail "fixed: vhdiinfo sees the new size" "$(vhdi_size "$F")"
[ "$(stat -c %s "$F")" = $((24 * MiB + 512)) ] && ok "fixed: the footer moved to the new end" || fail "fixed: the footer moved to the new end" "$(stat -c %s "$F")"
check "fixed: shrink" "$VDISK" resize -q -f vhd --shrink "$F" 10M
"$VDISK" resize -q -f raw --shrink "$S" 10M
same_as "fixed after shrinking" "$F" "$S"
check "fixed: grow with preallocation=full" "$VDISK" resize -q -f vhd --preallocation=full "$F" 12M
"$VDISK" resize -q -f raw "$S" 12M
same_as "fixed after a preallocated grow" "$F" "$S"
check_fails "rebase -u of a fixed disk is refused" "$VDISK" rebase -u -f vhd -b "$D" -F vhd "$F"

# ---- differencing ----
P=$T/p.vhd C=$T/c.vhd S=$T/c.raw
"$VDISK" create -q -f vhd -o force_size=on "$P" 32M
"$VDISK" io -f vhd -c "write -P 0xab 0 32M" "$P" >/dev/null
"$VDISK" create -q -f vhd -b p.vhd -F vhd "$C"
"$VDISK" create -q -f raw "$S" 32M
"$VDISK" io -f raw -c "write -P 0xab 0 32M" "$S" >/dev/null
both "$C" "$S" -c "write -P 0xcd 1M 2M"
psum=$(md5sum < "$P")
check "differencing: write-zeroes over the parent's data" both "$C" "$S" \
    -c "write -z 8M 4M" -c "write -z 512 1024" -c "write -z 2M 512k" -c "write -z 20M 3000"
same_chain "differencing after write-zeroes" "$C" "$S"
[ "$(md5sum < "$P")" = "$psum" ] && ok "differencing: the parent is unchanged" || fail "differencing: the parent is unchanged"
# discard: the child's own sectors read the parent again
check "differencing: discard" "$VDISK" io -f vhd -c "discard 1M 1M" "$C"
"$VDISK" io -f raw -c "write -P 0xab 1M 1M" "$S" >/dev/null
same_chain "differencing after discard" "$C" "$S"
check "differencing: vdisk check" "$VDISK" check -q -f vhd "$C"

# ---- rebase -u ----
cp "$P" "$T/p2.vhd"
check "rebase -u onto another parent" "$VDISK" rebase -u -f vhd -b p2.vhd -F vhd "$C"
vhdiinfo "$C" > "$T/vhdi.txt" 2>&1
grep -q "Parent filename.*p2.vhd" "$T/vhdi.txt" && ok "vhdiinfo reads the new parent name" || fail "vhdiinfo reads the new parent name" "$(grep -i parent "$T/vhdi.txt")"
grep -q "backing file: p2.vhd" <<<"$("$VDISK" info -f vhd "$C")" && ok "vdisk info shows the new parent" || fail "vdisk info shows the new parent"
rm "$P"
same_chain "differencing on its new parent" "$C" "$S"
check "rebase -u with no parent" "$VDISK" rebase -u -f vhd -b "" "$C"
grep -q "Disk type.*Dynamic" <<<"$(vhdiinfo "$C")" && ok "no parent: a dynamic disk" || fail "no parent: a dynamic disk"
# what came from the parent now reads as zeros
qemu-img convert -f vpc -O raw "$C" "$T/c2.raw"
cmp -s <(head -c 512 "$T/c2.raw") <(head -c 512 /dev/zero) && ok "no parent: the parent's sectors read zeros" || fail "no parent: the parent's sectors read zeros"
cmp -s <(head -c $((3 * MiB)) "$T/c2.raw" | tail -c 524288) <(head -c 524288 /dev/zero | tr '\0' '\315') && \
    ok "no parent: the child's own data stays" || fail "no parent: the child's own data stays"
# a dynamic disk given a parent keeps reading its own blocks
check "rebase -u of a dynamic disk onto a parent" "$VDISK" rebase -u -f vhd -b p2.vhd -F vhd "$C"
check "it reads its own blocks as before (data, and zeros not the parent's)" "$VDISK" io -f vhd \
    -c "read -P 0xcd 2621440 524288" -c "read -P 0 8M 4M" -c "read -P 0xab 14M 2M" "$C"
grep -q "backing file: p2.vhd" <<<"$("$VDISK" info -f vhd "$C")" && ok "dynamic -> differencing: parent recorded" || fail "dynamic -> differencing: parent recorded"
check_fails "rebase -u onto a missing parent fails" "$VDISK" rebase -u -f vhd -b nothere.vhd -F vhd "$C"
check_fails "rebase -u onto a non-VHD parent fails" "$VDISK" rebase -u -f vhd -b c2.raw -F raw "$C"
echo "1..$_n"
