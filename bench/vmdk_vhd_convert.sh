#!/usr/bin/env bash
# vdisk convert vs qemu-img convert on the corpus (bench/corpus.sh), in one
# run, same data: raw -> VMDK streamOptimized, VMDK streamOptimized -> qcow2,
# raw -> VHD dynamic, VHD dynamic -> raw. Each case runs RUNS times (default
# 3) per tool, alternating; the median wall and CPU (user+sys) times and the
# ratio vdisk / qemu-img are printed (below 1.0: vdisk is faster). Targets:
# streamOptimized at most 0.4x qemu-img's wall time, the others at most 1.0x.
# The inputs of the later cases are made once by qemu-img, so both tools
# read the same files. vdisk convert flushes the target before it exits;
# qemu-img's default target cache (unsafe) never does, so the "qemu -t wb"
# rows (qemu-img -t writeback, which flushes at the end) are the
# like-for-like comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
VDISK=${VDISK:-build/bin/vdisk}
RUNS=${RUNS:-3}
src=$(bench/corpus.sh)
dir=build/bench/vmdkvhd
mkdir -p "$dir"
cat "$src" > /dev/null
[ -s "$dir/in.vmdk" ] || qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$src" "$dir/in.vmdk"
[ -s "$dir/in.vhd" ] || qemu-img convert -f raw -O vpc -o subformat=dynamic "$src" "$dir/in.vhd"
cat "$dir/in.vmdk" "$dir/in.vhd" > /dev/null

# one OUT TOOL ARGS...: "wall cpu" of one run writing OUT
one() {
    local out=$1 t; shift
    rm -f "$out"
    /usr/bin/time -o "$dir/time" -f '%e %U %S' "$@" "$out" > /dev/null
    t=$(tail -1 "$dir/time")
    cp --sparse=always "$out" "$dir/last.$(basename "$out")" 2>/dev/null || true
    rm -f "$out"
    sync -f "$dir" 2>/dev/null || true
    awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' <<<"$t"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

case_run() {    # name, target, output file, vdisk args, qemu-img args
    local name=$1 target=$2 out=$3 vargs=$4 qargs=$5 vw=() vc=() qw=() qc=() r
    for ((i = 0; i < RUNS; i++)); do
        r=$(one "$out" $VDISK convert $vargs); vw+=("${r% *}"); vc+=("${r#* }")
        r=$(one "$out" qemu-img convert $qargs); qw+=("${r% *}"); qc+=("${r#* }")
    done
    local vwm vcm qwm qcm ratio
    vwm=$(printf '%s\n' "${vw[@]}" | median); vcm=$(printf '%s\n' "${vc[@]}" | median)
    qwm=$(printf '%s\n' "${qw[@]}" | median); qcm=$(printf '%s\n' "${qc[@]}" | median)
    ratio=$(awk -v a="$vwm" -v b="$qwm" 'BEGIN { print (b > 0 ? a / b : 0) }')
    printf '%-32s vdisk %6.2fs wall %6.2fs cpu | qemu-img %6.2fs wall %6.2fs cpu | wall ratio %.2f (target <= %s)  cpu ratio %.2f\n' \
        "$name" "$vwm" "$vcm" "$qwm" "$qcm" "$ratio" "$target" \
        "$(awk -v a="$vcm" -v b="$qcm" 'BEGIN { print (b > 0 ? a / b : 0) }')"
}

echo "vmdk_vhd_convert: $(du -h --apparent-size "$src" | cut -f1) corpus ($(du -h "$src" | cut -f1) allocated), $RUNS runs, median, $(nproc) CPUs, load $(cut -d" " -f1-3 /proc/loadavg)"
case_run "raw->vmdk streamOptimized" 0.4 "$dir/out.vmdk" \
    "-c -f raw -O vmdk -o subformat=streamOptimized $src" "-f raw -O vmdk -o subformat=streamOptimized $src"
case_run "vmdk stream->qcow2" 1.0 "$dir/out.qcow2" "-f vmdk -O qcow2 $dir/in.vmdk" "-f vmdk -O qcow2 $dir/in.vmdk"
case_run "vmdk stream->qcow2, qemu -t wb" 1.0 "$dir/out.qcow2" "-f vmdk -O qcow2 $dir/in.vmdk" "-t writeback -f vmdk -O qcow2 $dir/in.vmdk"
case_run "raw->vhd dynamic" 1.0 "$dir/out.vhd" "-f raw -O vhd -o subformat=dynamic $src" "-f raw -O vpc -o subformat=dynamic $src"
case_run "raw->vhd dynamic, qemu -t wb" 1.0 "$dir/out.vhd" "-f raw -O vhd -o subformat=dynamic $src" "-t writeback -f raw -O vpc -o subformat=dynamic $src"
case_run "vhd dynamic->raw" 1.0 "$dir/out.raw" "-f vhd -O raw $dir/in.vhd" "-f vpc -O raw $dir/in.vhd"
case_run "vhd dynamic->raw, qemu -t wb" 1.0 "$dir/out.raw" "-f vhd -O raw $dir/in.vhd" "-t writeback -f vpc -O raw $dir/in.vhd"
ls -l "$dir"/last.* 2>/dev/null | awk '{ printf "# last output %s: %s bytes\n", $9, $5 }'
rm -f "$dir"/last.*
