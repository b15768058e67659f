#!/usr/bin/env bash
# Raw images through every I/O engine and both cache modes, with `vdisk io`
# and qemu-io checking each other: reads, writes (aligned and not),
# asynchronous writes in flight together, write-zeroes, discard, resize.
source "$(dirname "$0")/../lib.sh"

qio() { qemu-io -f raw "$@" > "$T/qio.log" 2>&1 && ! grep -q "Pattern verification failed" "$T/qio.log"; }

for aio in io_uring native threads; do
    for cache in writeback none; do
        tag="$aio/$cache"
        img=$T/io-$aio-$cache.raw
        "$VDISK" create -q -f raw "$img" 8M
        V=("$VDISK" io -f raw --aio=$aio -t $cache)
        out=$("${V[@]}" -c engine "$img" 2>&1)
        [ "$out" = "$aio" ] && ok "$tag: engine in use" || fail "$tag: engine in use" "$out"

        check "$tag: write 64k, vdisk reads it back" "${V[@]}" -c "write -q -P 0xab 0 64k" -c "read -q -P 0xab 0 64k" "$img"
        check "$tag: qemu-io reads vdisk's write" qio -c "read -P 0xab 0 64k" -c "read -P 0 64k 64k" "$img"
        qemu-io -f raw -c "write -P 0x3c 1M 192k" "$img" > /dev/null
        check "$tag: vdisk reads qemu-io's write" "${V[@]}" -c "read -q -P 0x3c 1M 192k" -c "read -q -P 0 960k 64k" "$img"

        # unaligned to the sector and the page (read-modify-write with O_DIRECT)
        check "$tag: unaligned write" "${V[@]}" -c "write -q -P 0x5a 1000 3000" -c "write -q -P 0x66 8191 2" "$img"
        check "$tag: unaligned write seen by qemu-io" qio -c "read -P 0xab 0 1000" -c "read -P 0x5a 1000 3000" \
            -c "read -P 0xab 4000 4191" -c "read -P 0x66 8191 2" -c "read -P 0xab 8193 57343" "$img"

        # several asynchronous writes in flight, then checked
        check "$tag: aio writes in flight" "${V[@]}" -c "aio_write -q -P 1 2M 256k" -c "aio_write -q -P 2 3M 128k" \
            -c "aio_write -q -P 3 4M 4k" -c "aio_write -q -P 4 5M 1M" -c "aio_flush" \
            -c "aio_read -q -P 1 2M 256k" -c "aio_read -q -P 4 5M 1M" -c aio_flush "$img"
        check "$tag: aio writes seen by qemu-io" qio -c "read -P 1 2M 256k" -c "read -P 2 3M 128k" \
            -c "read -P 3 4M 4k" -c "read -P 4 5M 1M" "$img"

        # write-zeroes, with and without unmap; discard (default discard=unmap)
        check "$tag: write -z" "${V[@]}" -c "write -q -z 2M 64k" -c "write -q -z -u 3M 128k" -c "discard -q 5M 512k" "$img"
        check "$tag: zeroes and discards read as zeros" qio -c "read -P 0 2M 64k" -c "read -P 1 2112k 192k" \
            -c "read -P 0 3M 128k" -c "read -P 0 5M 512k" -c "read -P 4 5632k 512k" "$img"
        hole=$(qemu-img map -f raw --output=json "$img" | jq -c '.[] | select(.start <= 5242880 and .start + .length >= 5767168) | .data')
        [ "$hole" = "false" ] && ok "$tag: discard punched a hole" || fail "$tag: discard punched a hole" "map: $hole"

        check_fails "$tag: read past the end" "${V[@]}" -c "read 8M 4k" "$img"
        check_fails "$tag: pattern mismatch fails" "${V[@]}" -c "read -P 0x77 0 4k" "$img"
        check "$tag: truncate" "${V[@]}" -c "truncate 12M" -c "write -q -P 9 11M 1M" "$img"
        [ "$(stat -c %s "$img")" = $((12 << 20)) ] && ok "$tag: truncate resized the file" || fail "$tag: truncate resized the file"
    done
done

# read-only opens refuse writes; commands from standard input
img=$T/ro.raw
"$VDISK" create -q -f raw "$img" 1M
check_fails "read-only refuses writes" "$VDISK" io -r -f raw -c "write 0 4k" "$img"
printf 'write -q -P 0x42 0 4k\nread -q -P 0x42 0 4k\n' | "$VDISK" io -f raw "$img" && ok "commands from stdin" || fail "commands from stdin"
check "stdin write visible" qio -c "read -P 0x42 0 4k" "$img"
