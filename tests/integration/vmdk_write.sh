#!/usr/bin/env bash
# VMDK and VHD images written by vdisk (every subformat) read identically
# by qemu-img (where QEMU knows the subformat) and by libyal's readers
# (vmdkinfo / vhdiinfo parse them; vmdkmount / vhdimount serve the same
# bytes when FUSE works here).
source "$(dirname "$0")/../lib.sh"

SIZE=70M
W=(-c "write -P 0x11 0 64k" -c "write -P 0x22 100k 3k" -c "write -P 0x33 5M 1M"
   -c "write -P 0x44 69M 1M" -c "write -P 0x55 130560 1024" -c "write -P 0x66 33M 4k")
"$VDISK" create -q -f raw "$T/shadow.raw" $SIZE
"$VDISK" io -f raw "${W[@]}" "$T/shadow.raw" >/dev/null

fuse_ok=0
if [ -e /dev/fuse ] && command -v vmdkmount >/dev/null && command -v fusermount >/dev/null; then fuse_ok=1; fi
mounts=()
on_exit 'for m in "${mounts[@]}"; do fusermount -u "$m" 2>/dev/null; done'

# mounted_equal TOOL IMG NAME: libyal's FUSE mount serves the shadow's bytes
mounted_equal() {
    local tool=$1 img=$2 name=$3 dir
    if [ $fuse_ok = 0 ]; then ok "$name: # SKIP no FUSE"; return; fi
    dir=$(mktemp -d "$T/mnt.XXXX")
    if ! timeout 20 "$tool" "$img" "$dir" >/dev/null 2>&1; then fail "$name: $tool failed"; return; fi
    mounts+=("$dir")
    local f; f=$(ls "$dir" | head -1)
    if [ -n "$f" ] && cmp -s -n "$(stat -c %s "$T/shadow.raw")" "$dir/$f" "$T/shadow.raw"; then ok "$name"
    else fail "$name" "content differs"; fi
    fusermount -u "$dir" 2>/dev/null
}

for sub in monolithicSparse monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat streamOptimized vmfs vmfsThin; do
    img=$T/v-$sub.vmdk
    check "create vmdk $sub" "$VDISK" create -q -f vmdk -o subformat=$sub "$img" $SIZE
    if [ $sub = streamOptimized ]; then
        # append-only: grains in order, each written once
        check "write vmdk $sub in order" "$VDISK" io -c "write -P 0x11 0 64k" -c "write -P 0x22 64k 64k" \
            -c "write -P 0x33 5M 1M" -c "write -P 0x44 69M 1M" "$img"
        "$VDISK" create -q -f raw "$T/shadow.raw" $SIZE
        "$VDISK" io -f raw -c "write -P 0x11 0 64k" -c "write -P 0x22 64k 64k" -c "write -P 0x33 5M 1M" \
            -c "write -P 0x44 69M 1M" "$T/shadow.raw" >/dev/null
    else
        check "write vmdk $sub" "$VDISK" io "${W[@]}" "$img"
    fi
    check "vdisk reads vmdk $sub back" "$VDISK" compare -q "$img" -F raw "$T/shadow.raw"
    if [ $sub != vmfsThin ]; then
        check "qemu-img reads vmdk $sub identically" qemu-img compare -q -f vmdk "$img" -F raw "$T/shadow.raw"
        check "qemu-img check vmdk $sub" qemu-img check -q -f vmdk "$img"
    fi
    check "vmdkinfo parses vmdk $sub" bash -c "vmdkinfo '$img' | grep -q 'Media size.*($((70 << 20)) bytes)'"
    case $sub in
        # libvmdk 20200926 mounts neither (qemu-img's monolithicFlat neither):
        # "Unsupported disk type"; vmdkinfo above still parses them
        monolithicFlat|vmfsThin) ok "vmdkmount vmdk $sub # SKIP libvmdk cannot mount this type" ;;
        *) mounted_equal vmdkmount "$img" "vmdkmount serves vmdk $sub identically" ;;
    esac
    if [ $sub = streamOptimized ]; then
        "$VDISK" create -q -f raw "$T/shadow.raw" $SIZE
        "$VDISK" io -f raw "${W[@]}" "$T/shadow.raw" >/dev/null
    fi
done

# streamOptimized layout as VMware writes it: header says "GD at end",
# footer copy of the header and the end-of-stream marker close the file.
img=$T/v-streamOptimized.vmdk
gd=$(od -An -tx8 -j56 -N8 "$img" | tr -d ' ')
[ "$gd" = ffffffffffffffff ] && ok "stream header: gdOffset at end" || fail "stream header gdOffset" "$gd"
sz=$(stat -c %s "$img")
ver=$(od -An -tu4 -j4 -N4 "$img" | tr -d ' ')
[ "$ver" = 3 ] && ok "stream header version 3" || fail "stream version" "$ver"
foot=$(dd if="$img" bs=512 skip=$((sz / 512 - 2)) count=1 status=none | head -c 4)
[ "$foot" = KDMV ] && ok "stream footer holds the header copy" || fail "stream footer" "$foot"
ftype=$(od -An -tu4 -j$((sz - 1536 + 12)) -N4 "$img" | tr -d ' ')
[ "$ftype" = 3 ] && ok "footer marker before the footer" || fail "footer marker" "$ftype"
eos=$(dd if="$img" bs=512 skip=$((sz / 512 - 1)) count=1 status=none | tr -d '\0' | wc -c)
[ "$eos" = 0 ] && ok "end-of-stream marker last" || fail "EOS marker"
check_fails "stream: rewriting a grain is refused" "$VDISK" io -c "write -P 0x99 0 64k" "$img"
check "stream: appending after reopen" "$VDISK" io -c "write -P 0x77 60M 64k" "$img"
check "stream: appended grain reads back (qemu-img)" qemu-io -f vmdk -r -c "read -P 0x77 60M 64k" "$img"

# twoGbMaxExtentSparse: writes across the 2 GiB extent boundary
"$VDISK" create -q -f vmdk -o subformat=twoGbMaxExtentSparse "$T/big.vmdk" 5G
check "write across sparse extents" "$VDISK" io -c "write -P 0x71 2047M 2M" -c "write -P 0x72 4100M 64k" "$T/big.vmdk"
check "qemu-img reads across the extents" qemu-io -f vmdk -r -c "read -P 0x71 2047M 2M" -c "read -P 0x72 4100M 64k" \
    -c "read -P 0 4099M 1M" "$T/big.vmdk"
check "qemu-img check of the 3 extents" qemu-img check -q "$T/big.vmdk"

# zeroed_grain: version 2 with the flag
check "create zeroed_grain" "$VDISK" create -q -f vmdk -o zeroed_grain=on "$T/zg.vmdk" $SIZE
[ "$(od -An -tu4 -j4 -N4 "$T/zg.vmdk" | tr -d ' ')" = 2 ] && ok "zeroed_grain writes version 2" || fail "zeroed_grain version"
check "qemu-img check zeroed_grain image" qemu-img check -q "$T/zg.vmdk"

# adapter types land in the DDB
for ad in ide buslogic lsilogic legacyESX; do
    "$VDISK" create -q -f vmdk -o adapter_type=$ad "$T/a-$ad.vmdk" 1G
    check "adapter_type $ad in the descriptor" grep -qa "ddb.adapterType = \"$ad\"" "$T/a-$ad.vmdk"
done
check_fails "unknown adapter_type refused" "$VDISK" create -q -f vmdk -o adapter_type=floppy "$T/bad.vmdk" 1G
check_fails "unknown subformat refused" "$VDISK" create -q -f vmdk -o subformat=bogus "$T/bad.vmdk" 1G

# a write changes the CID once per open; flat too
cid0=$(grep -a '^CID=' "$T/v-monolithicFlat.vmdk")
"$VDISK" io -c "write -P 0x12 0 4k" -c "write -P 0x13 8k 4k" "$T/v-monolithicFlat.vmdk" >/dev/null
cid1=$(grep -a '^CID=' "$T/v-monolithicFlat.vmdk")
[ "$cid0" != "$cid1" ] && ok "a write to a flat extent changes the CID" || fail "CID unchanged" "$cid0"
"$VDISK" io -r -c "read 0 4k" "$T/v-monolithicFlat.vmdk" >/dev/null
[ "$cid1" = "$(grep -a '^CID=' "$T/v-monolithicFlat.vmdk")" ] && ok "a read leaves the CID" || fail "read changed CID"

# unknown descriptor keys survive a rewrite
sed -i 's/^ddb.adapterType.*/&\nddb.vendorThing = "kept"/' "$T/v-monolithicFlat.vmdk"
"$VDISK" io -c "write -P 0x14 0 4k" "$T/v-monolithicFlat.vmdk" >/dev/null
check "unknown ddb keys are kept on rewrite" grep -q 'ddb.vendorThing = "kept"' "$T/v-monolithicFlat.vmdk"

# ---- VHD ----
for sub in fixed dynamic; do
    img=$T/v-$sub.vhd
    check "create vhd $sub" "$VDISK" create -q -f vhd -o subformat=$sub "$img" $SIZE
    check "write vhd $sub" "$VDISK" io "${W[@]}" "$img"
    check "vdisk reads vhd $sub back" "$VDISK" compare -q "$img" -F raw "$T/shadow.raw"
    check "qemu-img reads vhd $sub identically" qemu-img compare -q -f vpc "$img" -F raw "$T/shadow.raw"
    check "vdisk check vhd $sub (qemu-img has no check for vpc)" "$VDISK" check -q "$img"
    check "vhdiinfo parses vhd $sub" bash -c "vhdiinfo '$img' | grep -qi 'Disk type.*$sub'"
    mounted_equal vhdimount "$img" "vhdimount serves vhd $sub identically"
done
check "vpc is an alias" "$VDISK" create -q -f vpc "$T/alias.vhd" 10M
a=$("$VDISK" info --output=json "$T/v-dynamic.vhd" | jq '."virtual-size"')
b=$(qemu-img info -f vpc --output=json "$T/v-dynamic.vhd" | jq '."virtual-size"')
[ "$a" = "$b" ] && ok "vhd size agrees with qemu-img ($a)" || fail "vhd size" "$a vs $b"
"$VDISK" create -q -f vhd -o force_size=on "$T/fs.vhd" 70000000
a=$(qemu-img info -f vpc --output=json "$T/fs.vhd" | jq '."virtual-size"')
[ "$a" = 70000128 ] && ok "force_size: qemu-img sees the exact (sector-rounded) size" || fail "force_size" "$a"
check_fails "unknown vhd subformat refused" "$VDISK" create -q -f vhd -o subformat=huge "$T/bad.vhd" 1G
check_fails "vhd over 2040 GiB refused" "$VDISK" create -q -f vhd "$T/bad.vhd" 3T
