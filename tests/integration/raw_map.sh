#!/usr/bin/env bash
# Block status of sparse raw files: `vdisk map` prints what
# `qemu-img map` prints, byte for byte, in JSON and human form.
source "$(dirname "$0")/../lib.sh"

same() {   # name, file, extra map args...
    local name=$1 f=$2; shift 2
    local a b
    a=$("$VDISK" map -f raw "$@" "$f" 2>&1)
    b=$(qemu-img map -f raw "$@" "$f" 2>&1)
    if [ "$a" = "$b" ]; then ok "$name"; else fail "$name" "$(diff <(echo "$b") <(echo "$a") | head -6 | tr '\n' ' ')"; fi
}

# an empty file, a fully allocated one, and sparse layouts
truncate -s 0 "$T/empty.raw"
same "empty file, json" "$T/empty.raw" --output=json
same "empty file, human" "$T/empty.raw"
head -c 3M /dev/urandom > "$T/full.raw"
same "fully allocated, json" "$T/full.raw" --output=json
truncate -s 64M "$T/hole.raw"
same "one hole, json" "$T/hole.raw" --output=json
same "one hole, human" "$T/hole.raw"

truncate -s 64M "$T/sparse.raw"
qemu-io -f raw -c "write -P 1 0 4k" -c "write -P 2 64k 128k" -c "write -P 0 1M 64k" -c "write -P 3 3M 5M" \
    -c "write -P 4 40M 4k" -c "write -P 5 63M 1M" "$T/sparse.raw" > /dev/null
same "sparse, json" "$T/sparse.raw" --output=json
same "sparse, human" "$T/sparse.raw" --output=human
same "sparse, -s/-l inside extents" "$T/sparse.raw" --output=json -s 100000 -l 4000000
same "sparse, -s/-l human" "$T/sparse.raw" -s 65536 -l 3M
same "sparse, -s past the end" "$T/sparse.raw" --output=json -s 128M

# a size that is no multiple of the page size, data at the end (qemu rounds
# raw sizes up to 512 bytes, vdisk does not: a multiple of 512 here)
truncate -s 1000448 "$T/odd.raw"
qemu-io -f raw -c "write -P 7 999000 1000" "$T/odd.raw" > /dev/null
same "odd size, json" "$T/odd.raw" --output=json

# after vdisk writes and discards, vdisk and qemu-img still agree
"$VDISK" create -q -f raw "$T/w.raw" 16M
"$VDISK" io -f raw -c "write -q -P 9 4M 1M" -c "write -q -P 8 8M 64k" -c "discard -q 4M 512k" "$T/w.raw"
same "after vdisk write/discard, json" "$T/w.raw" --output=json

check_fails "map of a missing file" "$VDISK" map "$T/nonexistent"
check_fails "map --output=bogus" "$VDISK" map --output=yaml "$T/w.raw"
