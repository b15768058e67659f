#!/usr/bin/env bash
# VMDK and VHD images made by qemu-img (every subformat it writes, adapter
# types, zeroed grains, qemu's own delta disks; vpc fixed, dynamic,
# force_size) read by vdisk byte for byte as qemu-img reads them.
source "$(dirname "$0")/../lib.sh"

# A source with data, holes, a partial grain and a last partial block.
qemu-img create -q -f raw "$T/src.raw" 70M
qemu-io -f raw -c "write -P 0x11 0 1M" -c "write -P 0x22 3M 100k" -c "write -P 0x33 33M 64k" \
    -c "write -P 0x44 69M 1M" -c "write -P 0x55 40000 1000" "$T/src.raw" >/dev/null
rand_file "$T/rnd" 2 vmdk
dd if="$T/rnd" of="$T/src.raw" bs=1M seek=10 conv=notrunc status=none

# same IMG QEMU_FMT: vdisk reads IMG exactly as qemu-img does (size and bytes)
same() {
    local img=$1 qf=$2 name=$3
    qemu-img convert -f "$qf" -O raw "$img" "$T/ref.raw" || { fail "$name: qemu-img convert"; return; }
    local vs qs
    vs=$("$VDISK" info --output=json "$img" | jq '."virtual-size"')
    qs=$(qemu-img info -f "$qf" --output=json "$img" | jq '."virtual-size"')
    [ "$vs" = "$qs" ] && ok "$name: virtual size $vs" || fail "$name: virtual size" "vdisk $vs, qemu-img $qs"
    check "$name: content equals qemu-img's" "$VDISK" compare -q "$img" -F raw "$T/ref.raw"
    # block status agrees on what holds non-zero data
    local a b
    a=$("$VDISK" map --output=json "$img" | jq -c '[.[] | select(.data and (.zero|not)) | [.start, .length]]')
    b=$(qemu-img map -f "$qf" --output=json "$img" | jq -c '[.[] | select(.data and (.zero|not)) | [.start, .length]]')
    [ "$a" = "$b" ] && ok "$name: data extents equal qemu-img map" || fail "$name: data extents" "$a vs $b"
}

for sub in monolithicSparse monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat streamOptimized; do
    qemu-img convert -f raw -O vmdk -o subformat=$sub "$T/src.raw" "$T/q-$sub.vmdk"
    same "$T/q-$sub.vmdk" vmdk "qemu vmdk $sub"
done
for ad in ide buslogic lsilogic legacyESX; do
    qemu-img convert -f raw -O vmdk -o adapter_type=$ad "$T/src.raw" "$T/q-$ad.vmdk"
    check "qemu vmdk adapter $ad: content" "$VDISK" compare -q "$T/q-$ad.vmdk" -F raw "$T/src.raw"
done
# more than one 2 GiB extent
qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse "$T/q-big.vmdk" 5G
qemu-io -f vmdk -c "write -P 0x66 2047M 2M" -c "write -P 0x67 4100M 64k" "$T/q-big.vmdk" >/dev/null
[ -f "$T/q-big-s003.vmdk" ] && ok "qemu made 3 sparse extents" || fail "qemu made 3 sparse extents"
check "5G twoGbMaxExtentSparse across extents" bash -c "
    '$VDISK' io -r -c 'read -P 0x66 2047M 2M' -c 'read -P 0x67 4100M 64k' -c 'read -P 0 4099M 1M' '$T/q-big.vmdk' >/dev/null"

# zeroed grains (version 2): a zero write over data leaves GTE 1
qemu-img convert -f raw -O vmdk -o zeroed_grain=on "$T/src.raw" "$T/q-zg.vmdk"
qemu-io -f vmdk -c "write -z 0 1M" -c "write -z 10M 128k" "$T/q-zg.vmdk" >/dev/null
[ "$(od -An -tu4 -j4 -N4 "$T/q-zg.vmdk" | tr -d ' ')" = 2 ] && ok "zeroed_grain image is version 2" || fail "zeroed_grain version"
same "$T/q-zg.vmdk" vmdk "qemu vmdk zeroed_grain"

# qemu's delta disk over a vmdk base: vdisk follows the chain
qemu-img create -q -f vmdk -b "$T/q-monolithicSparse.vmdk" -F vmdk "$T/q-delta.vmdk"
qemu-io -f vmdk -c "write -P 0x77 512k 4k" -c "write -P 0x78 50M 1M" "$T/q-delta.vmdk" >/dev/null
same "$T/q-delta.vmdk" vmdk "qemu vmdk delta"

for sub in fixed dynamic; do
    qemu-img convert -f raw -O vpc -o subformat=$sub "$T/src.raw" "$T/q-$sub.vhd"
    same "$T/q-$sub.vhd" vpc "qemu vpc $sub"
    qemu-img convert -f raw -O vpc -o subformat=$sub,force_size=on "$T/src.raw" "$T/q-$sub-fs.vhd"
    same "$T/q-$sub-fs.vhd" vpc "qemu vpc $sub force_size"
done
a=$("$VDISK" info --output=json "$T/q-dynamic-fs.vhd" | jq '."virtual-size"')
[ "$a" = $((70 << 20)) ] && ok "force_size keeps the exact size" || fail "force_size size" "$a"
check "alias vpc is accepted" "$VDISK" info -f vpc "$T/q-dynamic.vhd"
