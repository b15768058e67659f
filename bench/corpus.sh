#!/usr/bin/env bash
# Builds (once) the benchmark corpus: build/bench/corpus.raw, a 2 GiB raw
# image holding an ext4 file system filled from /usr/share, sparse where
# the file system has no data. Prints its path. Other benchmarks call it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/bench/corpus.raw
if [ -s "$out" ] && [ "$(stat -c %s "$out")" = 2147483648 ]; then
    echo "$out"
    exit 0
fi
mkdir -p build/bench
tmp=$out.tmp.$$
trap 'rm -f "$tmp"' EXIT
truncate -s 2G "$tmp"
# -E root_owner: files as they are; lazy init keeps the image sparse.
mkfs.ext4 -q -F -d /usr/share -E lazy_itable_init=1,lazy_journal_init=1 -L corpus "$tmp" >&2
mv "$tmp" "$out"
trap - EXIT
echo "$out"
