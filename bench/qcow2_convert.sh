#!/usr/bin/env bash
# vdisk convert vs qemu-img convert with qcow2, side by side in one run on
# the corpus (bench/corpus.sh: 2 GiB raw, ext4 from /usr/share):
#   raw -> qcow2, raw -> qcow2 -c zstd, raw -> qcow2 -c zlib,
#   qcow2 (zstd) -> raw, qcow2 -> qcow2.
# Like is compared with like, in two pairings per case:
#   durable  vdisk's default (synced once at the end)  vs  qemu-img -t writeback
#   unsafe   vdisk -t unsafe (no sync at all)           vs  qemu-img's default
# (the unsafe pairing is left out when this vdisk has no -t unsafe).
# Each pairing runs RUNS times per tool (RUNS_C for the compressing cases),
# alternating tools, each run after a sync; the median wall and CPU
# (user+sys) times are printed with the output sizes (allocated) and the
# ratios vdisk / qemu-img. CASES (a grep -E pattern on the case names) and
# MODES ("durable unsafe") pick a subset.
# Targets (2 cores): compressed converts <= 0.5x qemu-img's wall time,
# the others <= 1.0x; output never larger.
set -euo pipefail
cd "$(dirname "$0")/.."
VDISK=${VDISK:-build/bin/vdisk}
RUNS=${RUNS:-3}
RUNS_C=${RUNS_C:-1}
CASES=${CASES:-.}
MODES=${MODES:-durable unsafe}
src=$(bench/corpus.sh)
dir=build/bench/qcow2
mkdir -p "$dir"
cat "$src" > /dev/null

# sources made once by qemu-img
[ -s "$dir/src.qcow2" ] || qemu-img convert -f raw -O qcow2 "$src" "$dir/src.qcow2"
[ -s "$dir/src-zstd.qcow2" ] || qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$src" "$dir/src-zstd.qcow2"
cat "$dir/src.qcow2" "$dir/src-zstd.qcow2" > /dev/null

# does this vdisk have a real -t unsafe (no sync at all, as qemu-img's default)?
if ! "$VDISK" convert --help 2>&1 | grep -q "unsafe: no sync at all"; then
    MODES=${MODES/unsafe/}
    echo "(this vdisk's convert has no real -t unsafe: durable pairing only)"
fi

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
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > 0 ? a / b : 0) }'; }

case_run() {    # name runs out src "common args"
    local name=$1 runs=$2 out=$3 in=$4 args=$5 mode vt qt
    grep -qE -e "$CASES" <<<"$name" || return 0
    for mode in $MODES; do
        if [ "$mode" = durable ]; then vt=""; qt="-t writeback"; else vt="-t unsafe"; qt=""; fi
        local vw=() vc=() qw=() qc=() r vs qs a b
        for ((i = 0; i < runs; i++)); do
            r=$(one "$dir/$out" "$in" $VDISK convert $vt $args); read -r a b vs <<<"$r"; vw+=("$a"); vc+=("$b")
            r=$(one "$dir/$out" "$in" qemu-img convert $qt $args); read -r a b qs <<<"$r"; qw+=("$a"); qc+=("$b")
        done
        local vwm vcm qwm qcm
        vwm=$(printf '%s\n' "${vw[@]}" | median); vcm=$(printf '%s\n' "${vc[@]}" | median)
        qwm=$(printf '%s\n' "${qw[@]}" | median); qcm=$(printf '%s\n' "${qc[@]}" | median)
        printf '%-18s %-7s vdisk %6.2fs wall %6.2fs cpu %4d MiB | qemu-img %6.2fs wall %6.2fs cpu %4d MiB | wall %.2fx cpu %.2fx size %.4fx\n' \
            "$name" "$mode" "$vwm" "$vcm" $((vs >> 20)) "$qwm" "$qcm" $((qs >> 20)) \
            "$(ratio "$vwm" "$qwm")" "$(ratio "$vcm" "$qcm")" "$(ratio "$vs" "$qs")"
    done
}

echo "qcow2_convert: $(du -h --apparent-size "$src" | cut -f1) corpus ($(du -h "$src" | cut -f1) allocated), RUNS=$RUNS RUNS_C=$RUNS_C, median; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "pairings: durable = vdisk default vs qemu-img -t writeback; unsafe = vdisk -t unsafe vs qemu-img default"
case_run "raw->qcow2" "$RUNS" out.qcow2 "$src" "-f raw -O qcow2"
case_run "raw->qcow2 -c zstd" "$RUNS_C" out.qcow2 "$src" "-c -f raw -O qcow2 -o compression_type=zstd"
case_run "raw->qcow2 -c zlib" "$RUNS_C" out.qcow2 "$src" "-c -f raw -O qcow2 -o compression_type=zlib"
case_run "qcow2(zstd)->raw" "$RUNS" out.raw "$dir/src-zstd.qcow2" "-f qcow2 -O raw"
case_run "qcow2->qcow2" "$RUNS" out.qcow2 "$dir/src.qcow2" "-f qcow2 -O qcow2"
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
