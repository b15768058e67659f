#!/usr/bin/env bash
# A real VM as the front-end of vdiskd's vhost-user-blk export: QEMU (TCG) boots Debian's kernel with a
# busybox initramfs whose guest program writes patterns with O_DIRECT from
# both CPUs (both virtqueues), flushes, reads back, discards and zeroes
# (tests/guest/guest_io.c). The host then compares the image with the
# expected content.
source "$(dirname "$0")/../lib.sh"
H=$VDISK_BUILD/tests/helpers
G=$VDISK_ROOT/build/guest

if ! command -v qemu-system-x86_64 > /dev/null; then
    fail "qemu-system-x86_64 is installed" "install qemu-system-x86"; exit 0
fi
if ! out=$("$VDISK_ROOT/tests/guest/build.sh" "$G" 2>&1); then
    fail "build the test VM (kernel package, initramfs)" "$out"; exit 0
fi
ok "test VM built (kernel $(cd "$G" && file -b vmlinuz | grep -o 'version [^ ]*'))"

# run_vm SOCKET NAME [APPEND]: boot the VM against SOCKET; console in $T/NAME.console
run_vm() {
    timeout 300 qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem -cpu max -smp 2 -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -chardev socket,id=c0,path="$1" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
        -kernel "$G/vmlinuz" -initrd "$G/initramfs.gz" \
        -append "console=ttyS0 panic=-1 quiet vdserial=vdisk-vm ${3:-}" \
        -nodefaults -display none -serial file:"$T/$2.console" -no-reboot > "$T/$2.qemu" 2>&1
}

"$G/guest_io" --expect "$T/expect.raw"

# raw image through the vdisk back-end
truncate -s 64M "$T/vm.raw"
"$VDISKD" --nbd "unix:$T/nbd.sock" --control "$T/ctl.sock" \
    --export "type=vhost-user-blk,name=vm,file=$T/vm.raw,format=raw,socket=$T/vm.sock,num-queues=2,serial=vdisk-vm" \
    2> "$T/serve.log" &
srv=$!
on_exit "kill $srv 2>/dev/null"
for _ in $(seq 100); do [ -S "$T/vm.sock" ] && break; sleep 0.05; done
# ... and at the end an online resize: the guest waits for its disk to grow
run_vm "$T/vm.sock" raw "vdpasses=1 vdresize=100663296" &
vm=$!
for _ in $(seq 3000); do grep -q WAIT-RESIZE "$T/raw.console" 2>/dev/null && break; kill -0 $vm 2>/dev/null || break; sleep 0.1; done
check "vhost-user-blk-resize while the guest runs" python3 - "$T/ctl.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
f.write(json.dumps({"execute": "vhost-user-blk-resize", "arguments": {"name": "vm", "size": 100663296}}) + "\n"); f.flush()
r = f.readline(); print(r); sys.exit(0 if '"return"' in r else 1)
PY
wait $vm; rc=$?
grep -E 'GUEST-|queues:|RESIZE' "$T/raw.console" | sed 's/^/# /'
check "guest saw the new capacity (config change through QEMU)" grep -q '^RESIZE-OK' "$T/raw.console"
if [ $rc -eq 0 ] && grep -q '^GUEST-OK' "$T/raw.console"; then ok "guest: O_DIRECT patterns, flush, discard, zero-out, serial on 2 queues"
else fail "guest: O_DIRECT patterns, flush, discard, zero-out, serial on 2 queues" "qemu rc $rc: $(tail -q -n 5 "$T/raw.console" "$T/raw.qemu" | tr '\n' ' ')"; fi
check "guest saw 2 virtqueues" grep -q '^queues: 2' "$T/raw.console"
read -r q0 q1 < <(python3 - "$T/ctl.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()   # greeting
f.write(json.dumps({"execute": "query-stats", "arguments": {"name": "vm"}}) + "\n"); f.flush()
r = json.loads(f.readline())["return"]
r = r[0] if isinstance(r, list) else r
def find(o):
    if isinstance(o, dict):
        if "queue-requests" in o: return o["queue-requests"]
        for v in o.values():
            x = find(v)
            if x: return x
    if isinstance(o, list):
        for v in o:
            x = find(v)
            if x: return x
print(*(find(r) or [0, 0]))
PY
)
kill $srv; wait $srv 2>/dev/null
sed 's/^/# /' "$T/serve.log"
if [ "${q0:-0}" -gt 0 ] && [ "${q1:-0}" -gt 0 ]; then ok "both queues carried requests ($q0, $q1)"
else fail "both queues carried requests" "per-queue: ${q0:-?}, ${q1:-?}"; fi
check "image content as expected (qemu-img compare)" qemu-img compare -f raw -F raw "$T/expect.raw" "$T/vm.raw"
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve.log"; then
    fail "back-end: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve.log")"
else ok "back-end: no sanitizer report"; fi

# the same guest on a qcow2 image: allocation under guest I/O, discard,
# zero clusters; the result must read back right in qemu-img and check clean
qemu-img create -q -f qcow2 "$T/vm.qcow2" 64M
"$VDISKD" --nbd "unix:$T/nbd2.sock" \
    --export "type=vhost-user-blk,name=vm,file=$T/vm.qcow2,format=qcow2,socket=$T/vq.sock,num-queues=2,serial=vdisk-vm" \
    2> "$T/serve2.log" &
srv=$!
on_exit "kill $srv 2>/dev/null"
for _ in $(seq 100); do [ -S "$T/vq.sock" ] && break; sleep 0.05; done
run_vm "$T/vq.sock" qcow2; rc=$?
if [ $rc -eq 0 ] && grep -q '^GUEST-OK' "$T/qcow2.console"; then ok "qcow2: guest patterns, flush, discard, zero-out"
else fail "qcow2: guest patterns, flush, discard, zero-out" "qemu rc $rc: $(grep GUEST "$T/qcow2.console" | tr '\n' ' ') $(tail -q -n 3 "$T/qcow2.qemu" "$T/serve2.log" | tr '\n' ' ')"; fi
kill $srv; wait $srv 2>/dev/null
check "qcow2: image content as expected (qemu-img compare)" qemu-img compare -f raw -F qcow2 "$T/expect.raw" "$T/vm.qcow2"
check "qcow2: qemu-img check finds no errors" qemu-img check -q "$T/vm.qcow2"
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve2.log"; then
    fail "qcow2: back-end: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve2.log")"
else ok "qcow2: back-end: no sanitizer report"; fi
