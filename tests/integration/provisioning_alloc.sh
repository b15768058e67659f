#!/usr/bin/env bash
# provisioning=thin|lazy-zeroed|eager-zeroed for raw, qcow2, VMDK and VHD,
# checked with the file system's own view: allocated blocks (stat) and
# unwritten extents (FIEMAP, through filefrag). `vdisk info` and `vdisk df`
# report the same; the images read as zeros with qemu-img.
source "$(dirname "$0")/../lib.sh"

SIZE=$((16 << 20))
blocks() { echo $(($(stat -c %b "$1") * 512)); }
unwritten() { filefrag -v "$1" 2>/dev/null | grep -c unwritten; }
# data file of an image: flat extents hold a VMDK's data
datafile() {
    case $1 in
        *.vmdk) [ -f "${1%.vmdk}-flat.vmdk" ] && echo "${1%.vmdk}-flat.vmdk" || echo "$1" ;;
        *) echo "$1" ;;
    esac
}
mkdir -p "$T/df"
for fmt in raw qcow2 vmdk vhd; do
    for p in thin lazy-zeroed eager-zeroed; do
        img=$T/df/$p.$fmt
        if ! "$VDISK" create -q -f $fmt -o provisioning=$p "$img" $SIZE; then fail "$fmt $p: create"; continue; fi
        f=$(datafile "$img")
        b=$(blocks "$f")
        case $p in
            thin)
                [ "$b" -lt $((4 << 20)) ] && ok "$fmt thin: $b bytes allocated" || fail "$fmt thin allocation" "$b" ;;
            lazy-zeroed)
                [ "$b" -ge $SIZE ] && [ "$(unwritten "$f")" -gt 0 ] && ok "$fmt lazy-zeroed: reserved, unwritten" \
                    || fail "$fmt lazy-zeroed" "blocks $b, unwritten $(unwritten "$f")" ;;
            eager-zeroed)
                [ "$b" -ge $SIZE ] && [ "$(unwritten "$f")" = 0 ] && ok "$fmt eager-zeroed: written" \
                    || fail "$fmt eager-zeroed" "blocks $b, unwritten $(unwritten "$f")" ;;
        esac
        if [ $fmt = vmdk ] || [ $fmt = vhd ]; then
            got=$("$VDISK" info --output=json "$img" | jq -r .provisioning)
            [ "$got" = $p ] && ok "$fmt $p: vdisk info says $got" || fail "$fmt $p: info provisioning" "$got"
        fi
        qf=$fmt; [ $fmt = vhd ] && qf=vpc
        check "$fmt $p: qemu-img reads zeros" qemu-io -f $qf -r -c "read -P 0 0 1M" -c "read -P 0 $((SIZE - (1 << 20))) 1M" "$img"
    done
done
# VMDK: thin is a sparse extent; thick ones are flat; the DDB says thin
grep -qa 'createType="monolithicSparse"' "$T/df/thin.vmdk" && grep -qa 'ddb.thinProvisioned = "1"' "$T/df/thin.vmdk" \
    && ok "vmdk thin: monolithicSparse, ddb.thinProvisioned" || fail "vmdk thin descriptor"
grep -q 'createType="monolithicFlat"' "$T/df/eager-zeroed.vmdk" && ! grep -q thinProvisioned "$T/df/eager-zeroed.vmdk" \
    && ok "vmdk eager-zeroed: monolithicFlat without thinProvisioned" || fail "vmdk eager descriptor"
# VHD: thin is dynamic, thick is fixed
[ "$(vhdiinfo "$T/df/thin.vhd" | grep -ci 'Disk type.*Dynamic')" = 1 ] && ok "vhd thin is dynamic" || fail "vhd thin type"
[ "$(vhdiinfo "$T/df/eager-zeroed.vhd" | grep -ci 'Disk type.*Fixed')" = 1 ] && ok "vhd eager-zeroed is fixed" || fail "vhd eager type"
# preallocation= spellings map the same way
"$VDISK" create -q -f vmdk -o preallocation=falloc "$T/pa.vmdk" 8M
[ "$(unwritten "$T/pa-flat.vmdk")" -gt 0 ] && ok "vmdk preallocation=falloc is lazy" || fail "preallocation=falloc"
check_fails "sparse subformat with eager-zeroed refused" "$VDISK" create -q -f vmdk -o subformat=streamOptimized,provisioning=eager-zeroed "$T/x.vmdk" 8M
check_fails "dynamic vhd with lazy-zeroed refused" "$VDISK" create -q -f vhd -o subformat=dynamic,provisioning=lazy-zeroed "$T/x.vhd" 8M
"$VDISK" create -q -f vmdk -o subformat=vmfsThin "$T/t.vmdk" 8M
[ "$("$VDISK" info --output=json "$T/t.vmdk" | jq -r .provisioning)" = thin ] && ok "vmfsThin reports thin" || fail "vmfsThin"

# vdisk df: one line per image (extents count with their VMDK), totals, warning
out=$("$VDISK" df --output=json "$T/df")
n=$(jq '.images | length' <<<"$out")
[ "$n" = 12 ] && ok "df lists the 12 images" || fail "df image count" "$n: $(jq -c '[.images[].filename]' <<<"$out")"
for fmt in qcow2 vmdk vhd raw; do
    for p in thin lazy-zeroed eager-zeroed; do
        got=$(jq -r ".images[] | select(.filename | endswith(\"/$p.$fmt\")) | .provisioning" <<<"$out")
        [ "$got" = $p ] && ok "df: $p.$fmt is $got" || fail "df: $p.$fmt" "$got"
    done
done
a=$(jq -r '.images[] | select(.filename | endswith("/eager-zeroed.vmdk")) | .allocated' <<<"$out")
[ "$a" -ge $SIZE ] && ok "df counts a VMDK's flat extent ($a)" || fail "df vmdk allocation" "$a"
"$VDISK" create -q -f vmdk "$T/df/huge.vmdk" 64T
out=$("$VDISK" df "$T/df" 2>&1)
grep -q "could outgrow" <<<"$out" && ok "df warns when thin disks could outgrow the file system" || fail "df warning" "$out"
grep -q "overcommit" <<<"$out" && ok "df prints the overcommit" || fail "df overcommit"
check_fails "df of a missing folder" "$VDISK" df "$T/nope"
