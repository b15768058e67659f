#!/usr/bin/env bash
# `make bench`: runs every benchmark (bench/*.sh but this file and the
# corpus builder), each printing vdisk's figures next to its peer's and the
# ratio. Results worth keeping go in bench/RESULTS.md with the command.
#   BENCH="pattern"   run only benchmarks whose name matches (shell glob)
set -uo pipefail
cd "$(dirname "$0")/.."
pattern=${BENCH:-*}
rc=0
for b in bench/*.sh; do
    name=$(basename "$b" .sh)
    case $name in run|corpus) continue ;; esac
    [[ $name == $pattern ]] || continue
    echo "== $name"
    bash "$b" || { echo "$name: failed (exit $?)"; rc=1; }
done
exit $rc
