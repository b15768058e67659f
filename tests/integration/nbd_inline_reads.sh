#!/usr/bin/env bash
# Buffered exports: the NBD server reads what the page cache holds inline
# (preadv2 RWF_NOWAIT on its loop) and hands the rest to io_uring. Whatever
# the cache holds -- nothing (dropped with fadvise DONTNEED through
# dd iflag=nocache), half the image, all of it -- every read over NBD must
# return the file's bytes: random 4 KiB reads at depth 32 (structured and
# simple replies), unaligned reads, reads that span cached and cold pages,
# and whole-image copies, for raw and for qcow2. And the loop threads
# that serve NBD connections run as SCHED_BATCH (nbd/conn.c).
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

rand_file "$T/d.raw" 24 inline
qemu-img convert -f raw -O qcow2 "$T/d.raw" "$T/d.qcow2"
uncache() { sync "$1"; dd if="$1" iflag=nocache count=0 status=none; }   # drop its pages
warm() { dd if="$1" of=/dev/null bs=1M count="$2" status=none; } # cache its first N MiB
# Pages of the file in the page cache (fincore from util-linux, when present).
cached_pages() { fincore -bn -o PAGES "$1" 2>/dev/null | tr -d ' ' || echo "?"; }

start_vdiskd d --nbd "unix:$T/s.sock" --log-level=warning \
    --export "name=raw,file=$T/d.raw,format=raw,cache=writeback" \
    --export "name=q,file=$T/d.qcow2,format=qcow2,cache=writeback" || exit 1

# reads.py URI FILE SEED STRUCTURED: reads at random offsets, 32 in flight,
# each compared with the file (the qcow2 export's guest bytes are d.raw).
cat > "$T/reads.py" <<'EOF'
import nbd, random, sys
uri, path, seed, structured = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
data = open(path, "rb").read()
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
rng = random.Random(seed)
size = h.get_size()
reqs = []
for i in range(600):
    if i % 3 == 0:                       # unaligned, up to 3 pages
        n = rng.randrange(1, 12289)
        off = rng.randrange(0, size - n)
    elif i % 3 == 1:                     # 4 KiB aligned
        n = 4096
        off = rng.randrange(0, size // 4096) * 4096
    else:                                # up to 256 KiB, across many pages
        n = rng.randrange(4096, 1 << 18)
        off = rng.randrange(0, size - n)
    reqs.append((off, n))
bad = 0
inflight = []
for off, n in reqs:
    buf = nbd.Buffer(n)
    inflight.append((h.aio_pread(buf, off), buf, off, n))
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    still = []
    for c, b, o, ln in inflight:
        if h.aio_command_completed(c):
            if b.to_bytearray() != data[o:o + ln]:
                bad += 1
                print("mismatch at %d+%d" % (o, ln), file=sys.stderr)
        else:
            still.append((c, b, o, ln))
    inflight = still
while inflight:
    h.poll(-1)
    still = []
    for c, b, o, ln in inflight:
        if h.aio_command_completed(c):
            if b.to_bytearray() != data[o:o + ln]:
                bad += 1
                print("mismatch at %d+%d" % (o, ln), file=sys.stderr)
        else:
            still.append((c, b, o, ln))
    inflight = still
h.shutdown()
print("ok" if bad == 0 else "%d bad reads" % bad)
EOF

reads() {   # NAME EXPORT IMAGE SEED STRUCTURED
    local out
    out=$($PY "$T/reads.py" "nbd+unix:///$2?socket=$T/s.sock" "$T/d.raw" "$4" "$5" 2>&1 | tail -3)
    if [ "$out" = ok ]; then ok "$1"; else fail "$1" "$(tr '\n' ' ' <<<"$out")"; fi
}

for exp in raw q; do
    img=$T/d.raw
    [ $exp = q ] && img=$T/d.qcow2
    uncache "$img"
    echo "# $exp: $(cached_pages "$img") pages of the image cached before the cold pass"
    reads "$exp: random reads, cold page cache, structured replies" $exp "$img" 1 1
    echo "# $exp: $(cached_pages "$img") pages cached after it"
    uncache "$img"
    reads "$exp: random reads, cold page cache, simple replies" $exp "$img" 2 0
    uncache "$img"
    warm "$img" 12
    reads "$exp: random reads, first half of the image cached" $exp "$img" 3 1
    warm "$img" 64
    reads "$exp: random reads, image cached" $exp "$img" 4 1
    reads "$exp: random reads, image cached, simple replies" $exp "$img" 5 0
    uncache "$img"
    warm "$img" 8
    rm -f "$T/copy.raw"
    nbdcopy --requests=32 "nbd+unix:///$exp?socket=$T/s.sock" "$T/copy.raw"
    check "$exp: nbdcopy of a partly cached image equals the file" cmp "$T/copy.raw" "$T/d.raw"
done

# fio with verification through the same path: write with crc32c headers,
# drop the cache, read back at depth 32.
rm -f "$T/copy.raw"
out=$(fio --name=w --ioengine=nbd --uri="nbd+unix:///raw?socket=$T/s.sock" --rw=randwrite --bs=4k \
    --iodepth=32 --size=8M --verify=crc32c --do_verify=0 --randseed=5150 --verify_state_save=0 \
    --output-format=terse 2>&1) || fail "fio write" "$out"
uncache "$T/d.raw"
out=$(fio --name=w --ioengine=nbd --uri="nbd+unix:///raw?socket=$T/s.sock" --rw=randread --bs=4k \
    --iodepth=32 --size=8M --verify=crc32c --verify_only --verify_fatal=1 --randseed=5150 \
    --verify_state_save=0 --output-format=terse 2>&1)
if [ $? -eq 0 ] && ! grep -qi 'verify.*fail\|bad magic\|crc32c.*wanted' <<<"$out"; then
    ok "fio crc32c verify of random writes, read back with a cold page cache"
else
    fail "fio crc32c verify of random writes, read back with a cold page cache" "$(tail -3 <<<"$out" | tr '\n' ' ')"
fi

check "daemon still serving" alive d "nbd+unix:///raw?socket=$T/s.sock"
# The loop thread that served the connections runs as SCHED_BATCH.
policies() { for t in /proc/"$1"/task/*; do chrt -p "${t##*/}" | sed -n 's/.*policy: //p'; done | sort | uniq -c | tr '\n' ' '; }
pol=$(policies "$d_pid")
if grep -q SCHED_BATCH <<<"$pol"; then ok "a connection's loop thread runs as SCHED_BATCH"
else fail "a connection's loop thread runs as SCHED_BATCH" "thread policies: $pol"; fi
stop_vdiskd d

VDISK_NBD_SCHED_BATCH=0 start_vdiskd e --nbd "unix:$T/e.sock" --log-level=warning \
    --export "name=raw,file=$T/d.raw,format=raw" || exit 1
nbdinfo --size "nbd+unix:///raw?socket=$T/e.sock" > /dev/null
pol=$(policies "$e_pid")
if ! grep -q SCHED_BATCH <<<"$pol"; then ok "VDISK_NBD_SCHED_BATCH=0 leaves the threads' policy alone"
else fail "VDISK_NBD_SCHED_BATCH=0 leaves the threads' policy alone" "thread policies: $pol"; fi
stop_vdiskd e
