#!/usr/bin/env bash
# `make crash-long`: the crash campaign for every format built in, with
# CRASH_POINTS kill points each (default 1000), on the optimised build.
# Formats with options worth covering get extra runs (FORMAT:OPTS below).
# CRASH_POWER=1 (`make crash-power`): every kill is also a power loss
# (tests/crash/crash.sh -P).
set -uo pipefail
cd "$(dirname "$0")/../.."
export VDISK_BUILD=${VDISK_BUILD:-build}
make --no-print-directory BUILD="$VDISK_BUILD" tests > /dev/null || exit 1
points=${CRASH_POINTS:-1000}
formats=$("$VDISK_BUILD"/bin/vdisk --help | sed -n 's/^Supported formats: //p')
rc=0
for f in $formats; do
    runs=("$f:")
    case $f in
        qcow2) runs+=("qcow2:lazy_refcounts=on" "qcow2:cluster_size=4096") ;;
    esac
    for r in "${runs[@]}"; do
        fmt=${r%%:*} opts=${r#*:}
        for cache in writeback none; do
            log=build/test-logs/crash$([ "${CRASH_POWER:-0}" = 1 ] && echo -power)-$fmt-${opts//[^a-z0-9]/_}-$cache.log
            mkdir -p build/test-logs
            tests/crash/crash.sh "$fmt" ${opts:+-o "$opts"} -t $cache -r ${CRASH_ROUNDS:-2} "$points" > "$log" 2>&1
            n_ok=$(grep -c '^ok ' "$log"); n_bad=$(grep -c '^not ok ' "$log")
            printf '%-40s %5d passed, %d failed  (%s)\n' "$fmt ${opts:-default} cache=$cache" "$n_ok" "$n_bad" "$(sed -n 's/^# crash .*seed \([0-9]*\).*/seed \1/p' "$log")"
            [ "$n_bad" -eq 0 ] && [ "$n_ok" -gt 0 ] || { rc=1; grep -A1 '^not ok ' "$log" | head -10; }
        done
    done
done
exit $rc
