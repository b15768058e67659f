#!/usr/bin/env bash
# Runs every test: cmocka unit tests (TAP), integration scripts
# (tests/integration/*.sh, TAP via tests/lib.sh) and a bounded run of each
# fuzz target. Prints each failure, a line per file, and last
# "N passed, N failed". Exit status 0 only when nothing failed.
#   TESTS="pattern"   run only files whose name matches (shell glob)
set -uo pipefail
cd "$(dirname "$0")/.."
export VDISK_BUILD=${VDISK_BUILD:-build/check}
export VDISK_FUZZ=${VDISK_FUZZ:-build/fuzz}
export VDISK_ROOT=$PWD
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
pattern=${TESTS:-*}
passed=0 failed=0
logdir=build/test-logs; mkdir -p "$logdir"

tally() {   # name log rc [seconds]
    local name=$1 log=$2 rc=$3 secs=${4:-} ok nok
    ok=$(grep -cE '^ok ' "$log")
    nok=$(grep -cE '^not ok ' "$log")
    if [ "$rc" -ne 0 ] && [ "$nok" -eq 0 ]; then
        nok=1; echo "not ok - $name exited with status $rc" >> "$log"
    fi
    if [ "$ok" -eq 0 ] && [ "$nok" -eq 0 ]; then
        nok=1; echo "not ok - $name ran no test" >> "$log"
    fi
    passed=$((passed + ok)); failed=$((failed + nok))
    printf '%-40s %4d passed, %d failed%s\n' "$name" "$ok" "$nok" "${secs:+  (${secs}s)}"
    if [ "$nok" -gt 0 ]; then grep -E '^not ok |^# ' "$log" | head -40 | sed 's/^/    /'; fi
}

for t in "$VDISK_BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t"); [[ $name == $pattern ]] || continue
    log=$logdir/$name.log
    start=$SECONDS
    CMOCKA_MESSAGE_OUTPUT=TAP timeout 600 "$t" > "$log" 2>&1; rc=$?
    tally "$name" "$log" $rc $((SECONDS - start))
done

for s in tests/integration/*.sh; do
    [ -f "$s" ] || continue
    name=$(basename "$s" .sh); [[ $name == $pattern ]] || continue
    log=$logdir/$name.log
    start=$SECONDS
    timeout 900 bash "$s" > "$log" 2>&1; rc=$?
    tally "$name" "$log" $rc $((SECONDS - start))
done

# Each fuzz target for a few seconds from its seed corpus: a crash fails it.
for f in "$VDISK_FUZZ"/fuzz_*; do
    [ -x "$f" ] || continue
    name=$(basename "$f"); [[ $name == $pattern ]] || continue
    log=$logdir/$name.log; seeds=fuzz/corpus/${name#fuzz_}
    work=$(mktemp -d)
    mkdir -p build/fuzz-artifacts
    { "$f" -max_total_time="${FUZZ_SECONDS:-15}" -rss_limit_mb=2048 -artifact_prefix=build/fuzz-artifacts/ \
        "$work" "$seeds" > "$log.raw" 2>&1; rc=$?; } || true
    if [ $rc -eq 0 ]; then echo "ok - $name fuzzed ${FUZZ_SECONDS:-15}s" > "$log"
    else { echo "not ok - $name found a crash (rc $rc)"; grep -E 'ERROR|SUMMARY|#0 ' "$log.raw" | head -5 | sed 's/^/# /'; } > "$log"; fi
    rm -rf "$work"
    tally "$name" "$log" 0
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
