#!/usr/bin/env bash
# A real VM as the front-end: QEMU (TCG) boots Debian's kernel with a
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

# run_vm SOCKET NAME: boot the VM against SOCKET; console in $T/NAME.console
run_vm() {
    timeout 300 qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem -cpu max -smp 2 -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -chardev socket,id=c0,path="$1" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
        -kernel "$G/vmlinuz" -initrd "$G/initramfs.gz" \
        -append "console=ttyS0 panic=-1 quiet vdserial=vdisk-vm" \
        -nodefaults -display none -serial file:"$T/$2.console" -no-reboot > "$T/$2.qemu" 2>&1
}

"$G/guest_io" --expect "$T/expect.raw"

# raw image through the vdisk back-end
truncate -s 64M "$T/vm.raw"
"$H/vhost_serve" --format raw --num-queues 2 --serial vdisk-vm "$T/vm.raw" "$T/vm.sock" 2> "$T/serve.log" &
srv=$!
on_exit "kill $srv 2>/dev/null"
for _ in $(seq 100); do [ -S "$T/vm.sock" ] && break; sleep 0.05; done
run_vm "$T/vm.sock" raw; rc=$?
grep -E 'GUEST-|queues:' "$T/raw.console" | sed 's/^/# /'
if [ $rc -eq 0 ] && grep -q '^GUEST-OK' "$T/raw.console"; then ok "guest: O_DIRECT patterns, flush, discard, zero-out, serial on 2 queues"
else fail "guest: O_DIRECT patterns, flush, discard, zero-out, serial on 2 queues" "qemu rc $rc: $(tail -5 "$T/raw.console" "$T/raw.qemu" | tr '\n' ' ')"; fi
check "guest saw 2 virtqueues" grep -q '^queues: 2' "$T/raw.console"
kill $srv; wait $srv 2>/dev/null
sed 's/^/# /' "$T/serve.log"
q0=$(sed -n 's/.*per-queue \([0-9]*\),.*/\1/p' "$T/serve.log"); q1=$(sed -n 's/.*per-queue [0-9]*,\([0-9]*\).*/\1/p' "$T/serve.log")
if [ "${q0:-0}" -gt 0 ] && [ "${q1:-0}" -gt 0 ]; then ok "both queues carried requests ($q0, $q1)"
else fail "both queues carried requests" "per-queue: ${q0:-?}, ${q1:-?}"; fi
check "image content as expected (qemu-img compare)" qemu-img compare -f raw -F raw "$T/expect.raw" "$T/vm.raw"
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve.log"; then
    fail "back-end: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve.log")"
else ok "back-end: no sanitizer report"; fi
