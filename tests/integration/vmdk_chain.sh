#!/usr/bin/env bash
# Delta VMDK and differencing VHD chains written by vdisk, read back through
# the chain against a raw shadow copy; parent identity checks (VMDK parentCID,
# VHD parent UUID) refuse a changed or replaced parent.
source "$(dirname "$0")/../lib.sh"

SIZE=40M
"$VDISK" create -q -f raw "$T/shadow.raw" $SIZE
# wr IMG FMT ARGS...: the same writes to the image and the shadow
wr() {
    local img=$1; shift
    "$VDISK" io "$@" "$img" >/dev/null && "$VDISK" io -f raw "$@" "$T/shadow.raw" >/dev/null
}

for fmt in vmdk vhd; do
    "$VDISK" create -q -f raw "$T/shadow.raw" $SIZE
    check "$fmt base" "$VDISK" create -q -f $fmt "$T/base.$fmt" $SIZE
    size=$("$VDISK" info --output=json "$T/base.$fmt" | jq '."virtual-size"')
    truncate -s "$size" "$T/shadow.raw"
    check "$fmt base writes" wr "$T/base.$fmt" -c "write -P 0x11 0 3M" -c "write -P 0x12 20M 2M" -c "write -P 0x13 39M 1M"
    check "$fmt mid over base" "$VDISK" create -q -f $fmt -b base.$fmt -F $fmt "$T/mid.$fmt"
    check "$fmt mid writes" wr "$T/mid.$fmt" -c "write -P 0x21 512k 4k" -c "write -P 0x22 1000 100" -c "write -P 0x23 21M 64k" \
        -c "write -P 0x24 30M 3M"
    check "$fmt top over mid" "$VDISK" create -q -f $fmt -b mid.$fmt "$T/top.$fmt"
    check "$fmt top writes" wr "$T/top.$fmt" -c "write -P 0x31 0 512" -c "write -P 0x32 513 1" -c "write -P 0x33 20M 8M" \
        -c "write -P 0x34 30M 4k"
    check "$fmt chain reads as the shadow" "$VDISK" compare -q "$T/top.$fmt" -F raw "$T/shadow.raw"
    [ "$("$VDISK" info --output=json --backing-chain "$T/top.$fmt" | jq length)" = 3 ] \
        && ok "$fmt chain has 3 layers" || fail "$fmt chain depth"
    qf=$fmt; [ $fmt = vhd ] && qf=vpc
    if [ $fmt = vmdk ]; then
        check "qemu-img reads the vmdk chain identically" qemu-img compare -q "$T/top.$fmt" -F raw "$T/shadow.raw"
        check "vmdkinfo sees the parent" bash -c "vmdkinfo '$T/top.vmdk' | grep -q 'Parent filename.*mid.vmdk'"
    else
        check "vhdiinfo sees the parent" bash -c "vhdiinfo '$T/top.vhd' | grep -q 'Parent filename.*mid.vhd'"
        check "vhdiinfo: differential" bash -c "vhdiinfo '$T/top.vhd' | grep -qi 'Disk type.*Differential'"
    fi
done

# VMDK: writing the parent changes its CID; the child is then refused
"$VDISK" io -c "write -P 0x55 10M 4k" "$T/mid.vmdk" >/dev/null
check_fails "vmdk child of a changed parent is refused" "$VDISK" compare -q "$T/top.vmdk" -F raw "$T/shadow.raw"
out=$("$VDISK" io -r -c "read 0 512" "$T/top.vmdk" 2>&1)
grep -q "parentCID" <<<"$out" && ok "the refusal names parentCID" || fail "refusal message" "$out"
check_fails "qemu-img agrees the vmdk chain is broken" qemu-img compare -q "$T/top.vmdk" -F raw "$T/shadow.raw"

# VHD: a parent with the same name but another UUID is refused
mv "$T/mid.vhd" "$T/mid-orig.vhd"
"$VDISK" create -q -f vhd -b base.vhd "$T/mid.vhd"
check_fails "vhd child of a replaced parent is refused" "$VDISK" io -r -c "read 0 512" "$T/top.vhd"
out=$("$VDISK" io -r -c "read 0 512" "$T/top.vhd" 2>&1)
grep -qi "unique id" <<<"$out" && ok "the refusal names the unique id" || fail "refusal message" "$out"
mv "$T/mid-orig.vhd" "$T/mid.vhd"
check "restoring the parent restores the chain" "$VDISK" io -r -c "read 0 512" "$T/top.vhd"

check_fails "vhd over a non-vhd parent refused" "$VDISK" create -q -f vhd -b "$T/base.vmdk" -F vmdk "$T/x.vhd"
check_fails "vmdk delta over a non-vmdk parent refused" "$VDISK" create -q -f vmdk -b "$T/base.vhd" -F vhd "$T/x.vmdk"
check_fails "vmdk delta of another size refused" "$VDISK" create -q -f vmdk -b base.vmdk "$T/y.vmdk" 10M

# rebase: -u rewrites parentFileNameHint and parentCID (the new parent's CID);
# a safe rebase copies what differs first
"$VDISK" create -q -f vmdk "$T/p1.vmdk" 8M
"$VDISK" io -c "write -P 0x61 0 64k" "$T/p1.vmdk" >/dev/null
"$VDISK" convert -O vmdk "$T/p1.vmdk" "$T/p2.vmdk"
"$VDISK" create -q -f vmdk -b p1.vmdk -F vmdk "$T/ch.vmdk"
"$VDISK" io -c "write -P 0x62 1M 64k" "$T/ch.vmdk" >/dev/null
check "rebase -u onto a copy of the parent" "$VDISK" rebase -u -b p2.vmdk -F vmdk "$T/ch.vmdk"
[ "$(grep -a '^parentCID' "$T/ch.vmdk" | cut -d= -f2)" = "$(grep -a '^CID' "$T/p2.vmdk" | cut -d= -f2)" ] \
    && ok "parentCID is the new parent's CID" || fail "parentCID after rebase"
check "qemu-img follows the rebased chain" qemu-io -r -c "read -P 0x61 0 64k" -c "read -P 0x62 1M 64k" "$T/ch.vmdk"
"$VDISK" create -q -f vmdk "$T/p3.vmdk" 8M
check "safe rebase onto an empty parent" "$VDISK" rebase -b p3.vmdk -F vmdk "$T/ch.vmdk"
check "content kept through the safe rebase" "$VDISK" io -r -c "read -P 0x61 0 64k" -c "read -P 0x62 1M 64k" "$T/ch.vmdk"
