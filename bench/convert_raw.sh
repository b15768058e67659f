#!/usr/bin/env bash
# vdisk convert vs qemu-img convert, raw -> raw, on the same corpus in one
# run: a sparse copy (default -S 4k) and a full copy (-S 0). Each case runs
# RUNS times (default 3) per tool, alternating tools; the median wall time
# and CPU time (user+sys) are printed with the ratio vdisk / qemu-img
# (below 1.0: vdisk is faster). The page cache is warm for both (the
# corpus is read once first); targets are removed between runs, after a
# sync so that one run's write-back does not slow the next.
set -euo pipefail
cd "$(dirname "$0")/.."
VDISK=${VDISK:-build/bin/vdisk}
RUNS=${RUNS:-3}
src=$(bench/corpus.sh)
dir=build/bench/convert
mkdir -p "$dir"
cat "$src" > /dev/null

# one TOOL ARGS...: prints "wall cpu" of one run
one() {
    local out=$dir/target.raw t
    rm -f "$out"
    /usr/bin/time -o "$dir/time" -f '%e %U %S' "$@" "$src" "$out" > /dev/null
    t=$(tail -1 "$dir/time")
    sync -f "$dir" 2>/dev/null || true
    rm -f "$out"
    awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' <<<"$t"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

case_run() {    # name, vdisk args, qemu-img args
    local name=$1 vargs=$2 qargs=$3 vw=() vc=() qw=() qc=() r
    for ((i = 0; i < RUNS; i++)); do
        r=$(one $VDISK convert $vargs); vw+=("${r% *}"); vc+=("${r#* }")
        r=$(one qemu-img convert $qargs); qw+=("${r% *}"); qc+=("${r#* }")
    done
    local vwm vcm qwm qcm
    vwm=$(printf '%s\n' "${vw[@]}" | median); vcm=$(printf '%s\n' "${vc[@]}" | median)
    qwm=$(printf '%s\n' "${qw[@]}" | median); qcm=$(printf '%s\n' "${qc[@]}" | median)
    printf '%-22s vdisk %6.2fs wall %6.2fs cpu | qemu-img %6.2fs wall %6.2fs cpu | wall ratio %.2f  cpu ratio %.2f\n' \
        "$name" "$vwm" "$vcm" "$qwm" "$qcm" \
        "$(awk -v a="$vwm" -v b="$qwm" 'BEGIN { print (b > 0 ? a / b : 0) }')" \
        "$(awk -v a="$vcm" -v b="$qcm" 'BEGIN { print (b > 0 ? a / b : 0) }')"
}

echo "convert_raw: $(du -h --apparent-size "$src" | cut -f1) corpus ($(du -h "$src" | cut -f1) allocated), $RUNS runs, median; load $(cut -d' ' -f1-3 /proc/loadavg)"
# Two pairings of the same durability:
#   vdisk's default (no syncs while copying, one sync at the end) against
#   qemu-img -t writeback (which flushes at the end);
#   vdisk -t unsafe (no sync at all) against qemu-img's default (-t unsafe).
case_run "sparse, durable" "-f raw -O raw" "-f raw -O raw -t writeback"
case_run "sparse, unsafe" "-f raw -O raw -t unsafe" "-f raw -O raw"
case_run "full -S 0, durable" "-f raw -O raw -S 0" "-f raw -O raw -S 0 -t writeback"
case_run "full -S 0, unsafe" "-f raw -O raw -S 0 -t unsafe" "-f raw -O raw -S 0"
