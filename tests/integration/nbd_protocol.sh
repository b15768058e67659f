#!/usr/bin/env bash
# NBD protocol corner cases through libnbd (nbdsh's python module) with
# strict mode off where the point is to send what a careful client would not.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

S=$T/nbd.sock
truncate -s 64M "$T/disk.raw"
rand_file "$T/blob" 1 seedp
dd if="$T/blob" of="$T/disk.raw" bs=1M seek=2 conv=notrunc status=none
cp "$T/disk.raw" "$T/ro.raw"
start_vdiskd d --nbd "unix:$S" --threads 2 \
    --export "name=rw,file=$T/disk.raw,format=raw,discard=unmap" \
    --export "name=ro,file=$T/ro.raw,format=raw,readonly=on" || exit 1

# Each case prints "PASS name" or "FAIL name: why"; turned into TAP below.
cat > "$T/cases.py" <<'PYEOF'
import errno, os, sys, nbd
sock, blobfile = sys.argv[1], sys.argv[2]
blob = open(blobfile, 'rb').read()
MiB = 1 << 20

def conn(name='rw', strict=True, structured=True, meta=('base:allocation', 'qemu:allocation-depth')):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    for m in meta:
        h.add_meta_context(m)
    h.set_export_name(name)
    h.connect_unix(sock)
    return h

def case(name):
    def wrap(fn):
        try:
            fn()
            print('PASS', name)
        except Exception as e:
            print('FAIL', name + ':', repr(e).replace('\n', ' '))
        sys.stdout.flush()
        return fn
    return wrap

def expect_err(fn, code):
    try:
        fn()
    except nbd.Error as e:
        if e.errno not in (code, errno.errorcode[code]):
            raise AssertionError('errno %s, wanted %s (%s)' % (e.errno, code, e.string))
        return
    raise AssertionError('succeeded, wanted errno %d' % code)

h = conn(strict=False)
ro = conn('ro', strict=False)
plain = conn(strict=False, structured=False, meta=())

@case('unaligned write and read (offset 1, length 3 / 4097)')
def _():
    h.pwrite(b'xyz', 1)
    assert h.pread(5, 0) == b'\0xyz\0'
    data = os.urandom(4097)
    h.pwrite(data, 12345)
    assert h.pread(4097, 12345) == data

@case('zero-length read and write succeed')
def _():
    assert h.pread(0, 4096) == b''
    h.pwrite(b'', 4096)

@case('read beyond the end: EINVAL')
def _():
    expect_err(lambda: h.pread(4096, 64 * MiB - 2048), errno.EINVAL)
    expect_err(lambda: h.pread(1, 1 << 40), errno.EINVAL)

@case('write beyond the end: ENOSPC')
def _():
    expect_err(lambda: h.pwrite(b'a' * 4096, 64 * MiB - 1), errno.ENOSPC)

@case('read larger than the 32 MiB maximum: EINVAL, connection still usable')
def _():
    expect_err(lambda: h.pread(32 * MiB + 1, 0), errno.EINVAL)
    assert h.pread(4, 2 * MiB) == blob[:4]

@case('write larger than the maximum: refused, payload skipped, still in sync')
def _():
    expect_err(lambda: h.pwrite(b'\1' * (32 * MiB + 4096), 0), errno.EOVERFLOW)
    assert h.pread(4, 2 * MiB) == blob[:4]

@case('unknown command flags: EINVAL')
def _():
    expect_err(lambda: h.pread(512, 0, 0x40), errno.EINVAL)
    expect_err(lambda: h.pwrite(b'q' * 512, 0, 0x100), errno.EINVAL)
    assert h.pread(4, 2 * MiB) == blob[:4]

@case('flag not valid for the command (REQ_ONE on read): EINVAL')
def _():
    expect_err(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)

@case('FUA write, flush, cache')
def _():
    h.pwrite(b'F' * 4096, 8 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    h.cache(MiB, 2 * MiB)
    assert h.pread(4096, 8 * MiB) == b'F' * 4096

@case('structured read of a hole comes back as a hole chunk')
def _():
    kinds = []
    def cb(buf, off, status, err):
        kinds.append((status, off, len(buf)))
        return 0
    buf = h.pread_structured(256 * 1024, 32 * MiB, cb)
    assert buf == bytes(256 * 1024)
    assert all(k[0] == nbd.READ_HOLE for k in kinds), kinds

@case('structured read of data then hole: data and hole chunks cover the range')
def _():
    kinds = []
    def cb(buf, off, status, err):
        kinds.append((status, off, len(buf)))
        return 0
    buf = h.pread_structured(2 * MiB, 2 * MiB, cb)
    assert buf[:MiB] == blob and buf[MiB:] == bytes(MiB)
    assert sum(k[2] for k in kinds) == 2 * MiB
    assert {k[0] for k in kinds} == {nbd.READ_DATA, nbd.READ_HOLE}, kinds

@case('DF: one content chunk for a mixed range')
def _():
    kinds = []
    def cb(buf, off, status, err):
        kinds.append(status)
        return 0
    buf = h.pread_structured(2 * MiB, 2 * MiB, cb, nbd.CMD_FLAG_DF)
    assert buf[:MiB] == blob and buf[MiB:] == bytes(MiB)
    assert kinds == [nbd.READ_DATA], kinds

@case('block status: both contexts describe data and hole')
def _():
    got = {}
    def cb(ctx, off, entries, err):
        got[ctx] = entries
        return 0
    h.block_status(4 * MiB, 1 * MiB, cb)
    a = got['base:allocation']
    assert a[0] == MiB and a[1] & 1 and a[2] == MiB and a[3] == 0, a
    assert 'qemu:allocation-depth' in got, got
    assert sum(got['qemu:allocation-depth'][0::2]) <= 4 * MiB

@case('block status REQ_ONE: a single descriptor per context')
def _():
    got = {}
    def cb(ctx, off, entries, err):
        got[ctx] = entries
        return 0
    h.block_status(8 * MiB, 0, cb, nbd.CMD_FLAG_REQ_ONE)
    assert len(got) == 2 and all(len(e) == 2 for e in got.values()), got

@case('block status beyond the end: EINVAL')
def _():
    expect_err(lambda: h.block_status(8192, 64 * MiB - 4096, lambda *a: 0), errno.EINVAL)

@case('block status without a negotiated context: EINVAL')
def _():
    expect_err(lambda: plain.block_status(4096, 0, lambda *a: 0), errno.EINVAL)

@case('simple replies (no structured replies): read and write')
def _():
    assert not plain.can_df()
    plain.pwrite(b'S' * 1000, 9 * MiB + 7)
    assert plain.pread(1000, 9 * MiB + 7) == b'S' * 1000
    expect_err(lambda: plain.pread(4096, 64 * MiB), errno.EINVAL)

@case('DF without structured replies: EINVAL')
def _():
    expect_err(lambda: plain.pread(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)

@case('write zeroes (NO_HOLE and may-unmap) reads back zeros')
def _():
    h.pwrite(b'Z' * 65536, 10 * MiB)
    h.zero(65536, 10 * MiB, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 10 * MiB) == bytes(65536)
    h.pwrite(b'Z' * 65536, 10 * MiB)
    h.zero(65536, 10 * MiB)
    assert h.pread(65536, 10 * MiB) == bytes(65536)

@case('FAST_ZERO: done quickly or refused with ENOTSUP, never half-done')
def _():
    h.pwrite(b'Q' * 65536, 11 * MiB)
    try:
        h.zero(65536, 11 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(65536, 11 * MiB) == bytes(65536)
    except nbd.Error as e:
        assert e.errno in (errno.ENOTSUP, 'ENOTSUP', 'EOPNOTSUPP'), e
        assert h.pread(65536, 11 * MiB) == b'Q' * 65536

@case('trim then write again')
def _():
    h.pwrite(b'T' * MiB, 12 * MiB)
    h.trim(MiB, 12 * MiB)
    h.pwrite(b'U' * 4096, 12 * MiB)
    assert h.pread(4096, 12 * MiB) == b'U' * 4096

@case('read-only export: write, trim, zero refused with EPERM; reads work')
def _():
    assert ro.is_read_only()
    expect_err(lambda: ro.pwrite(b'a' * 512, 0), errno.EPERM)
    expect_err(lambda: ro.trim(4096, 0), errno.EPERM)
    expect_err(lambda: ro.zero(4096, 0), errno.EPERM)
    assert ro.pread(MiB, 2 * MiB) == blob
    ro.flush()

@case('many requests in flight complete, replies in any order')
def _():
    bufs = [nbd.Buffer(65536) for i in range(200)]
    cookies = [h.aio_pread(bufs[i], (i * 65536) % (16 * MiB)) for i in range(200)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)

@case('multi-conn: a flush on one connection after a write on another; both see it')
def _():
    a, b = conn(), conn()
    assert a.can_multi_conn()
    a.pwrite(b'M' * 8192, 13 * MiB)
    b.flush()
    assert b.pread(8192, 13 * MiB) == b'M' * 8192
    a.shutdown(); b.shutdown()

@case('option haggling: list, info, list/set meta contexts, then go')
def _():
    o = nbd.NBD()
    o.set_opt_mode(True)
    o.connect_unix(sock)
    names = []
    o.opt_list(lambda n, d: names.append(n) or 0)
    assert sorted(names) == ['ro', 'rw'], names
    o.set_export_name('ro')
    o.opt_info()
    assert o.get_size() == 64 * MiB and o.is_read_only()
    ctx = []
    o.opt_list_meta_context(lambda n: ctx.append(n) or 0)
    assert sorted(ctx) == ['base:allocation', 'qemu:allocation-depth'], ctx
    o.set_export_name('nosuch')
    try:
        o.opt_info()
        raise AssertionError('info on a missing export succeeded')
    except nbd.Error:
        pass
    o.set_export_name('rw')
    o.add_meta_context('base:allocation')
    o.opt_go()
    assert o.can_meta_context('base:allocation')
    o.shutdown()

@case('NBD_OPT_ABORT ends the handshake politely')
def _():
    o = nbd.NBD()
    o.set_opt_mode(True)
    o.connect_unix(sock)
    o.opt_abort()

@case('disconnect with requests in flight: all of them are answered')
def _():
    c = conn()
    cookies = [c.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b'D' * 4096)), 14 * MiB + i * 4096) for i in range(32)]
    c.shutdown()
    d = conn()
    assert d.pread(32 * 4096, 14 * MiB) == b'D' * (32 * 4096)
    d.shutdown()

for x in (h, ro, plain):
    x.shutdown()
PYEOF

while IFS= read -r line; do
    case $line in
        PASS\ *) ok "${line#PASS }" ;;
        FAIL\ *) fail "${line#FAIL }" ;;
        *) echo "# $line" ;;
    esac
done < <($PY "$T/cases.py" "$S" "$T/blob" 2>&1)

# Several connections, 64 requests in flight each, random unaligned writes
# then a full read-back against a shadow copy (tests/helpers/nbd_stress.c).
if cc -O2 -o "$T/nbd_stress" "$VDISK_ROOT/tests/helpers/nbd_stress.c" -lnbd 2>"$T/cc.log"; then
    check "stress: 4 connections x 64 in flight, data verified" \
        "$T/nbd_stress" "nbd+unix:///rw?socket=$S" 4 64 2000
else
    fail "stress helper builds" "$(head -3 "$T/cc.log")"
fi

alive d "nbd+unix:///rw?socket=$S" && ok "daemon still serving" || fail "daemon still serving"
stop_vdiskd d
