#!/usr/bin/env bash
# vdisk convert vs qemu-img convert on the corpus (bench/corpus.sh), in one
# run, same data: raw -> VMDK streamOptimized, VMDK streamOptimized -> qcow2,
# raw -> VHD dynamic, VHD dynamic -> raw. Each case runs RUNS times (default
# 3; RUNS_S for the streamOptimized writes, whose qemu-img side takes ~40 s)
# per tool, alternating; the median wall and CPU (user+sys) times and the
# ratio vdisk / qemu-img are printed (below 1.0: vdisk is faster). Targets:
# streamOptimized at most 0.4x qemu-img's wall time, the others at most 1.0x.
# The inputs of the later cases are made once by qemu-img, so both tools
# read the same files.
#
# Each case is run in two pairings with the same durability on both sides:
#   "durable": vdisk's default (no syncs while copying, one sync of the
#              target at the end) against qemu-img -t writeback (syncs as
#              its drivers order metadata, and at the end);
#   "no sync": vdisk -t unsafe against qemu-img's default (cache=unsafe):
#              neither syncs; the copy may still be in the page cache.
set -euo pipefail
cd "$(dirname "$0")/.."
VDISK=${VDISK:-build/bin/vdisk}
RUNS=${RUNS:-3}
RUNS_S=${RUNS_S:-$RUNS}
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

case_run() {    # name, target, output file, vdisk args, qemu-img args [, runs]
    local name=$1 target=$2 out=$3 vargs=$4 qargs=$5 runs=${6:-$RUNS} vw=() vc=() qw=() qc=() r
    for ((i = 0; i < runs; i++)); do
        r=$(one "$out" $VDISK convert $vargs); vw+=("${r% *}"); vc+=("${r#* }")
        r=$(one "$out" qemu-img convert $qargs); qw+=("${r% *}"); qc+=("${r#* }")
    done
    local vwm vcm qwm qcm ratio
    vwm=$(printf '%s\n' "${vw[@]}" | median); vcm=$(printf '%s\n' "${vc[@]}" | median)
    qwm=$(printf '%s\n' "${qw[@]}" | median); qcm=$(printf '%s\n' "${qc[@]}" | median)
    ratio=$(awk -v a="$vwm" -v b="$qwm" 'BEGIN { print (b > 0 ? a / b : 0) }')
    printf '%-36s vdisk %6.2fs wall %6.2fs cpu | qemu-img %6.2fs wall %6.2fs cpu | wall ratio %.2f (target <= %s)  cpu ratio %.2f\n' \
        "$name" "$vwm" "$vcm" "$qwm" "$qcm" "$ratio" "$target" \
        "$(awk -v a="$vcm" -v b="$qcm" 'BEGIN { print (b > 0 ? a / b : 0) }')"
}

# pair NAME TARGET OUT "VDISK ARGS" "QEMU-IMG ARGS" [RUNS]: both pairings
pair() {
    case_run "$1, durable" "$2" "$3" "$4" "-t writeback $5" ${6:-}
    case_run "$1, no sync" "$2" "$3" "-t unsafe $4" "$5" ${6:-}
}

echo "vmdk_vhd_convert: $(du -h --apparent-size "$src" | cut -f1) corpus ($(du -h "$src" | cut -f1) allocated), RUNS=$RUNS RUNS_S=$RUNS_S, median, $(nproc) CPUs, load $(cut -d" " -f1-3 /proc/loadavg)"
CASES=${CASES:-stream stream2qcow2 vhd vhd2raw}
for c in $CASES; do
    case $c in
    stream) pair "raw->vmdk streamOptimized" 0.4 "$dir/out.vmdk" \
        "-f raw -O vmdk -o subformat=streamOptimized $src" "-f raw -O vmdk -o subformat=streamOptimized $src" "$RUNS_S" ;;
    stream2qcow2) pair "vmdk stream->qcow2" 1.0 "$dir/out.qcow2" "-f vmdk -O qcow2 $dir/in.vmdk" "-f vmdk -O qcow2 $dir/in.vmdk" ;;
    vhd) pair "raw->vhd dynamic" 1.0 "$dir/out.vhd" "-f raw -O vhd -o subformat=dynamic $src" "-f raw -O vpc -o subformat=dynamic $src" ;;
    vhd2raw) pair "vhd dynamic->raw" 1.0 "$dir/out.raw" "-f vhd -O raw $dir/in.vhd" "-f vpc -O raw $dir/in.vhd" ;;
    esac
done
ls -l "$dir"/last.* 2>/dev/null | awk '{ printf "# last output %s: %s bytes\n", $9, $5 }'
rm -f "$dir"/last.*
