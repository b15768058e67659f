#!/usr/bin/env bash
# Hostile and broken NBD clients (raw sockets): garbage, malformed and
# oversized options, bad requests, a client that never reads its replies,
# clients that vanish mid-request. Each must get the right error or be
# disconnected while the daemon keeps serving a well-behaved client; the
# daemon runs under ASan/UBSan (make check) and must exit cleanly.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

S=$T/nbd.sock
truncate -s 256M "$T/disk.raw"
rand_file "$T/blob" 1 seedh
dd if="$T/blob" of="$T/disk.raw" bs=1M seek=3 conv=notrunc status=none
start_vdiskd d --nbd "unix:$S" --threads 2 --log-level=warning --export "name=disk,file=$T/disk.raw,format=raw" || exit 1
pid=$d_pid

cat > "$T/hostile.py" <<'PYEOF'
import os, socket, struct, sys, threading, time
sock, pid = sys.argv[1], int(sys.argv[2])
blob = open(sys.argv[3], 'rb').read()
MAGIC, IHAVEOPT, REPMAGIC = 0x4e42444d41474943, 0x49484156454f5054, 0x3e889045565a9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR, OPT_LISTMETA, OPT_SETMETA = 1, 2, 3, 5, 6, 7, 8, 9, 10
ERR = lambda n: (1 << 31) | n

def connect(flags=3, greet=True):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    if greet:
        g = recvn(s, 18)
        assert g[:16] == struct.pack('>QQ', MAGIC, IHAVEOPT), g
        if flags is not None:
            s.sendall(struct.pack('>I', flags))
    return s

def recvn(s, n):
    b = b''
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            raise EOFError('closed after %d of %d bytes' % (len(b), n))
        b += x
    return b

def closed(s, timeout=10):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False

def opt(s, o, data=b''):
    s.sendall(struct.pack('>QII', IHAVEOPT, o, len(data)) + data)

def reply(s):
    magic, o, t, n = struct.unpack('>QIII', recvn(s, 20))
    assert magic == REPMAGIC, hex(magic)
    return o, t, recvn(s, n)

def go(s, name=b'disk', structured=False):
    if structured:
        opt(s, OPT_SR)
        assert reply(s)[1] == 1
    opt(s, OPT_GO, struct.pack('>I', len(name)) + name + struct.pack('>H', 0))
    size = None
    while True:
        o, t, d = reply(s)
        if t == 3 and struct.unpack('>H', d[:2])[0] == 0:
            size = struct.unpack('>Q', d[2:10])[0]
        elif t == 1:
            return size
        else:
            raise AssertionError('GO failed: type %x %r' % (t, d))

def request(s, typ, off, length, flags=0, cookie=1, payload=b''):
    s.sendall(struct.pack('>IHHQQI', 0x25609513, flags, typ, cookie, off, length) + payload)

def simple_reply(s, datalen=0):
    magic, err, cookie = struct.unpack('>IIQ', recvn(s, 16))
    assert magic == 0x67446698, hex(magic)
    return err, cookie, (recvn(s, datalen) if not err and datalen else b'')

def good_client():
    s = connect()
    assert go(s) == 256 << 20
    request(s, 0, 3 << 20, len(blob), cookie=77)
    err, cookie, data = simple_reply(s, len(blob))
    assert err == 0 and cookie == 77 and data == blob
    request(s, 2, 0, 0)
    assert closed(s)

def rss():
    for line in open('/proc/%d/status' % pid):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024

def case(name):
    def wrap(fn):
        try:
            fn()
            good_client()
            print('PASS', name)
        except Exception as e:
            print('FAIL', name + ':', repr(e))
        sys.stdout.flush()
    return wrap

@case('garbage instead of client flags: disconnected')
def _():
    s = connect(flags=None)
    s.sendall(os.urandom(4096))
    assert closed(s)

@case('garbage option header: disconnected')
def _():
    s = connect()
    s.sendall(b'\xff' * 64)
    assert closed(s)

@case('oversized option (1 MiB): ERR_TOO_BIG, then the handshake goes on')
def _():
    s = connect()
    opt(s, OPT_INFO, b'\0' * (1 << 20))
    o, t, d = reply(s)
    assert t == ERR(9), hex(t)
    assert go(s) == 256 << 20

@case('option length 4 GiB - 1, then gone: nothing held')
def _():
    s = connect()
    s.sendall(struct.pack('>QII', IHAVEOPT, OPT_GO, 0xffffffff) + b'\0' * 100000)
    s.close()

@case('export name longer than 4096 bytes: ERR_INVALID')
def _():
    s = connect()
    name = b'n' * 5000
    opt(s, OPT_GO, struct.pack('>I', len(name)) + name + b'\0\0')
    assert reply(s)[1] == ERR(3)

@case('GO whose lengths disagree: ERR_INVALID')
def _():
    s = connect()
    opt(s, OPT_GO, struct.pack('>I', 100) + b'disk')
    assert reply(s)[1] == ERR(3)
    opt(s, OPT_GO, struct.pack('>I', 4) + b'disk' + struct.pack('>H', 5) + b'\0\0')
    assert reply(s)[1] == ERR(3)

@case('unknown option: ERR_UNSUP, LIST still works')
def _():
    s = connect()
    opt(s, 4242, b'abc')
    assert reply(s)[1] == ERR(1)
    opt(s, OPT_LIST)
    o, t, d = reply(s)
    assert t == 2 and d[4:] == b'disk', (t, d)
    assert reply(s)[1] == 1

@case('LIST with data: ERR_INVALID')
def _():
    s = connect()
    opt(s, OPT_LIST, b'x')
    assert reply(s)[1] == ERR(3)

@case('STARTTLS on a server without TLS: refused')
def _():
    s = connect()
    opt(s, OPT_STARTTLS)
    assert reply(s)[1] & (1 << 31)

@case('SET_META_CONTEXT before structured replies: ERR_INVALID')
def _():
    s = connect()
    q = b'base:allocation'
    opt(s, OPT_SETMETA, struct.pack('>I', 4) + b'disk' + struct.pack('>II', 1, len(q)) + q)
    assert reply(s)[1] == ERR(3)

@case('meta context query with a bad length: ERR_INVALID')
def _():
    s = connect()
    opt(s, OPT_SR)
    reply(s)
    opt(s, OPT_SETMETA, struct.pack('>I', 4) + b'disk' + struct.pack('>II', 1, 999) + b'base:')
    assert reply(s)[1] == ERR(3)

@case('EXPORT_NAME of an unknown export: disconnected')
def _():
    s = connect()
    opt(s, OPT_EXPORT_NAME, b'nosuch')
    assert closed(s)

@case('unknown client flags: disconnected')
def _():
    s = connect(flags=0x80)
    assert closed(s)

@case('request with a bad magic: disconnected')
def _():
    s = connect()
    go(s)
    s.sendall(b'\x12\x34\x56\x78' + b'\0' * 24)
    assert closed(s)

@case('unknown command: EINVAL, connection still usable')
def _():
    s = connect()
    go(s)
    request(s, 42, 0, 512, cookie=5)
    err, cookie, _ = simple_reply(s)
    assert err == 22 and cookie == 5
    request(s, 0, 3 << 20, 16, cookie=6)
    err, cookie, data = simple_reply(s, 16)
    assert err == 0 and data == blob[:16]

@case('write beyond the end with its payload: ENOSPC, payload skipped')
def _():
    s = connect()
    go(s)
    request(s, 1, (256 << 20) - 10, 4096, cookie=9, payload=b'w' * 4096)
    assert simple_reply(s)[0] == 28
    request(s, 0, 3 << 20, 16, cookie=10)
    assert simple_reply(s, 16)[2] == blob[:16]

@case('disconnect in the middle of a write payload')
def _():
    s = connect()
    go(s)
    request(s, 1, 0, 1 << 20, payload=b'x' * 1000)
    s.close()

@case('disconnect in the middle of an option')
def _():
    s = connect()
    s.sendall(struct.pack('>QI', IHAVEOPT, OPT_GO) + b'\0\0')
    s.close()

@case('200 connections idle in the handshake do not block others')
def _():
    socks = [connect() for _ in range(200)]
    good_client()
    for x in socks:
        x.close()

@case('a client that never reads replies: the daemon stops reading it, memory stays bounded')
def _():
    s = connect()
    go(s)
    before = rss()
    s.setblocking(False)
    sent = 0
    hdr = b''.join(struct.pack('>IHHQQI', 0x25609513, 0, 0, i, (i % 200) << 20, 1 << 20) for i in range(20000))
    deadline = time.time() + 5
    while sent < len(hdr) and time.time() < deadline:
        try:
            sent += s.send(hdr[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.05)
    time.sleep(0.5)
    grown = rss() - before
    for _ in range(3):
        good_client()
    s.close()
    # 20000 x 1 MiB were asked for; the in-flight cap holds ~64 MiB (plus allocator slack).
    assert sent < len(hdr), 'the daemon read every request'
    assert grown < 600 << 20, 'RSS grew by %d MiB' % (grown >> 20)
    print('# never-reading client: %d of %d request bytes accepted, RSS +%d MiB' % (sent, len(hdr), grown >> 20))
PYEOF

while IFS= read -r line; do
    case $line in
        PASS\ *) ok "${line#PASS }" ;;
        FAIL\ *) fail "${line#FAIL }" ;;
        *) echo "$line" ;;
    esac
done < <($PY "$T/hostile.py" "$S" "$pid" "$T/blob" 2>&1)

# A client that never chooses an export is closed after --handshake-timeout;
# one that did is left alone.
cp "$T/disk.raw" "$T/disk2.raw"
start_vdiskd t --nbd "unix:$T/t.sock" --handshake-timeout=1 --log-level=warning \
    --export "name=disk,file=$T/disk2.raw,format=raw" || exit 1
check "--handshake-timeout closes an idle handshake, not a served client" $PY - "$T/t.sock" <<'PYEOF'
import socket, struct, sys, time, nbd
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
s.recv(18)
t0 = time.time()
h = nbd.NBD(); h.connect_unix(sys.argv[1])
assert s.recv(100) == b'', 'idle handshake not closed'
took = time.time() - t0
assert 0.5 < took < 8, took
time.sleep(1.5)
assert len(h.pread(4096, 0)) == 4096
h.shutdown()
PYEOF
stop_vdiskd t

check "after all that, nbdcopy still round-trips" bash -o pipefail -c "nbdcopy 'nbd+unix:///disk?socket=$S' '$T/out.raw' && cmp '$T/out.raw' '$T/disk.raw'"
stop_vdiskd d
