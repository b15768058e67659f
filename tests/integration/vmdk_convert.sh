#!/usr/bin/env bash
# vdisk convert between every pair of raw, qcow2, VMDK (each subformat) and
# VHD (fixed, dynamic): the content survives (vdisk and qemu-img agree) and
# the copy stays sparse; -c writes compressed grains for streamOptimized.
source "$(dirname "$0")/../lib.sh"

SIZE=16M
"$VDISK" create -q -f raw "$T/src.raw" $SIZE
rand_file "$T/rnd" 1 conv
dd if="$T/rnd" of="$T/src.raw" bs=64k seek=3 conv=notrunc status=none
"$VDISK" io -f raw -c "write -P 0x22 5M 100k" -c "write -P 0x44 15M 1M" -c "write -P 0x55 7777 3333" "$T/src.raw" >/dev/null

kinds=(raw qcow2 vmdk:monolithicSparse vmdk:monolithicFlat vmdk:twoGbMaxExtentSparse vmdk:twoGbMaxExtentFlat
       vmdk:streamOptimized vmdk:vmfs vhd:fixed vhd:dynamic)
ext() { case $1 in vmdk*) echo vmdk ;; vhd*) echo vhd ;; *) echo "$1" ;; esac; }
# convert_to KIND SRC DST (a raw source is named as such; the rest are probed)
convert_to() {
    local fmt=${1%%:*} sub=${1#*:} sf=()
    [[ $2 == *.raw ]] && sf=(-f raw)
    if [ "$fmt" = "$1" ]; then "$VDISK" convert "${sf[@]}" -O "$fmt" "$2" "$3"
    else "$VDISK" convert "${sf[@]}" -O "$fmt" -o subformat="$sub" "$2" "$3"; fi
}
# allocated bytes of an image and its extents
alloc() { local t=0 f; for f in "$1" "${1%.*}"-*; do [ -f "$f" ] && t=$((t + $(stat -c %b "$f") * 512)); done; echo $t; }
qfmt() { case $1 in vhd*) echo vpc ;; *) echo "${1%%:*}" ;; esac; }

# the sources, made from the raw one
for k in "${kinds[@]}"; do
    n=${k//:/-}
    convert_to "$k" "$T/src.raw" "$T/s-$n.$(ext "$k")" || fail "make source $k"
done
bad=0 tried=0
for s in "${kinds[@]}"; do
    sn=${s//:/-}
    src=$T/s-$sn.$(ext "$s")
    for d in "${kinds[@]}"; do
        dn=${d//:/-}
        dst=$T/d-$sn--$dn.$(ext "$d")
        tried=$((tried + 1))
        if ! out=$(convert_to "$d" "$src" "$dst" 2>&1); then fail "$s -> $d: convert" "$out"; bad=$((bad + 1)); continue; fi
        if ! "$VDISK" compare -q -f "${d%%:*}" "$dst" -F raw "$T/src.raw"; then fail "$s -> $d: vdisk reads the source's content"; bad=$((bad + 1)); continue; fi
        if ! qemu-img compare -q -f "$(qfmt "$d")" "$dst" -F raw "$T/src.raw" 2>/dev/null; then
            fail "$s -> $d: qemu-img reads the source's content"; bad=$((bad + 1)); continue; fi
        a=$(alloc "$dst")
        if [ "$a" -gt $((6 << 20)) ]; then fail "$s -> $d: stays sparse" "$a bytes allocated"; bad=$((bad + 1)); fi
        rm -f "$T"/d-*
    done
done
[ $bad = 0 ] && ok "all $tried conversions keep content (vdisk and qemu-img) and sparseness"

# -c: streamOptimized grains are compressed (much smaller than the data)
"$VDISK" create -q -f raw "$T/z.raw" 80M      # three grain tables' worth
"$VDISK" io -f raw -c "write -P 0x61 0 16M" -c "write -P 0x62 70M 64k" "$T/z.raw" >/dev/null
check "convert -c to streamOptimized" "$VDISK" convert -f raw -c -O vmdk -o subformat=streamOptimized "$T/z.raw" "$T/z.vmdk"
sz=$(stat -c %s "$T/z.vmdk")
[ "$sz" -lt $((1 << 20)) ] && ok "compressed grains: 16 MiB of a pattern in $sz bytes" || fail "compressed size" "$sz"
check "qemu-img reads the compressed stream" qemu-img compare -q "$T/z.vmdk" -F raw "$T/z.raw"
check "vmdkinfo reads the compressed stream" bash -c "vmdkinfo '$T/z.vmdk' | grep -q 'Stream optimized'"
# without -c: a streamOptimized target is still written as whole compressed
# grains (each written once), even where zero runs split a grain's data
"$VDISK" io -f raw -c "write -P 0x63 20M 4k" -c "write -P 0x64 20983808 4k" -c "write -P 0x65 21032960 8k" \
    "$T/z.raw" >/dev/null
check "convert to streamOptimized without -c (zero runs inside grains)" \
    "$VDISK" convert -f raw -O vmdk -o subformat=streamOptimized "$T/z.raw" "$T/z2.vmdk"
sz=$(stat -c %s "$T/z2.vmdk")
[ "$sz" -lt $((1 << 20)) ] && ok "without -c: grains compressed ($sz bytes)" || fail "without -c: grains compressed" "$sz"
check "qemu-img reads the stream written without -c" qemu-img compare -q "$T/z2.vmdk" -F raw "$T/z.raw"
check "qemu-img check of the stream written without -c" qemu-img check -q "$T/z2.vmdk"
check "streamOptimized -> qcow2" "$VDISK" convert -O qcow2 "$T/z.vmdk" "$T/z.qcow2"
"$VDISK" io -f raw -c "write -z 20M 128k" "$T/z.raw" >/dev/null
check "qcow2 from the stream equals the source" qemu-img compare -q "$T/z.qcow2" -F raw "$T/z.raw"
# a stream qemu-img made converts too
qemu-img convert -O vmdk -o subformat=streamOptimized "$T/z.raw" "$T/qz.vmdk"
check "qemu's stream -> vhd" "$VDISK" convert -O vhd "$T/qz.vmdk" "$T/qz.vhd"
check "vhd from qemu's stream equals the source" qemu-img compare -q -f vpc "$T/qz.vhd" -F raw "$T/z.raw"
