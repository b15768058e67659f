#!/usr/bin/env bash
# vdisk convert vs qemu-img convert with qcow2, side by side in one run on
# the corpus (bench/corpus.sh: 2 GiB raw, ext4 from /usr/share):
#   raw -> qcow2, raw -> qcow2 -c zstd, raw -> qcow2 -c zlib,
#   qcow2 (zstd) -> raw, qcow2 -> qcow2.
# Each case runs RUNS times per tool (RUNS_C for the compressing cases),
# alternating tools; the median wall and CPU (user+sys) times are printed
# with the output sizes (allocated) and the ratios vdisk / qemu-img. Each
# run starts after a sync. qemu-img runs with
# -t writeback so that it flushes the target at the end as vdisk does.
# Targets (2 cores): compressed converts <= 0.5x qemu-img's wall time,
# the others <= 1.0x; output never larger.
set -euo pipefail
cd "$(dirname "$0")/.."
VDISK=${VDISK:-build/bin/vdisk}
RUNS=${RUNS:-3}
RUNS_C=${RUNS_C:-1}
src=$(bench/corpus.sh)
dir=build/bench/qcow2
mkdir -p "$dir"
cat "$src" > /dev/null

# sources made once by qemu-img
[ -s "$dir/src.qcow2" ] || qemu-img convert -f raw -O qcow2 "$src" "$dir/src.qcow2"
[ -s "$dir/src-zstd.qcow2" ] || qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$src" "$dir/src-zstd.qcow2"
cat "$dir/src.qcow2" "$dir/src-zstd.qcow2" > /dev/null

# one OUTFILE SRC TOOL ARGS...: prints "wall cpu size" of one run
one() {
    local out=$1 in=$2 t sz; shift 2
    rm -f "$out"
    sync    # start each run without write-back left over from the previous one
    /usr/bin/time -o "$dir/time" -f '%e %U %S' "$@" "$in" "$out" > /dev/null
    t=$(tail -1 "$dir/time")
    sz=$(du -B1 "$out" | cut -f1)
    rm -f "$out"
    awk -v s="$sz" '{ printf "%.3f %.3f %d\n", $1, $2 + $3, s }' <<<"$t"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

case_run() {    # name runs out src "vdisk args" "qemu-img args"
    local name=$1 runs=$2 out=$3 in=$4 vargs=$5 qargs=$6 vw=() vc=() qw=() qc=() r vs qs
    for ((i = 0; i < runs; i++)); do
        r=$(one "$dir/$out" "$in" $VDISK convert $vargs); read -r a b vs <<<"$r"; vw+=("$a"); vc+=("$b")
        r=$(one "$dir/$out" "$in" qemu-img convert $qargs); read -r a b qs <<<"$r"; qw+=("$a"); qc+=("$b")
    done
    local vwm vcm qwm qcm
    vwm=$(printf '%s\n' "${vw[@]}" | median); vcm=$(printf '%s\n' "${vc[@]}" | median)
    qwm=$(printf '%s\n' "${qw[@]}" | median); qcm=$(printf '%s\n' "${qc[@]}" | median)
    printf '%-18s vdisk %7.2fs wall %7.2fs cpu %6d MiB | qemu-img %7.2fs wall %7.2fs cpu %6d MiB | wall %.2fx cpu %.2fx size %.3fx\n' \
        "$name" "$vwm" "$vcm" $((vs >> 20)) "$qwm" "$qcm" $((qs >> 20)) \
        "$(awk -v a="$vwm" -v b="$qwm" 'BEGIN { print (b > 0 ? a / b : 0) }')" \
        "$(awk -v a="$vcm" -v b="$qcm" 'BEGIN { print (b > 0 ? a / b : 0) }')" \
        "$(awk -v a="$vs" -v b="$qs" 'BEGIN { print (b > 0 ? a / b : 0) }')"
}

echo "qcow2_convert: $(du -h --apparent-size "$src" | cut -f1) corpus ($(du -h "$src" | cut -f1) allocated), RUNS=$RUNS RUNS_C=$RUNS_C, median; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
case_run "raw->qcow2" "$RUNS" out.qcow2 "$src" "-f raw -O qcow2" "-t writeback -f raw -O qcow2"
case_run "raw->qcow2 -c zstd" "$RUNS_C" out.qcow2 "$src" "-c -f raw -O qcow2 -o compression_type=zstd" "-t writeback -c -f raw -O qcow2 -o compression_type=zstd"
case_run "raw->qcow2 -c zlib" "$RUNS_C" out.qcow2 "$src" "-c -f raw -O qcow2 -o compression_type=zlib" "-t writeback -c -f raw -O qcow2 -o compression_type=zlib"
case_run "qcow2(zstd)->raw" "$RUNS" out.raw "$dir/src-zstd.qcow2" "-f qcow2 -O raw" "-t writeback -f qcow2 -O raw"
case_run "qcow2->qcow2" "$RUNS" out.qcow2 "$dir/src.qcow2" "-f qcow2 -O qcow2" "-t writeback -f qcow2 -O qcow2"
