#!/usr/bin/env bash
# QEMU reconnecting to a restarted vdiskd: the guest repeats write / flush
# / verify passes from both CPUs over a vhost-user-blk disk (chardev with
# reconnect=1) while vdiskd is killed with SIGKILL and started again. QEMU
# hands the inflight region back, vdiskd resubmits what the dead process
# had taken, the guest sees only a pause: every pass verifies, and the
# image holds what it should.
source "$(dirname "$0")/../lib.sh"
G=$VDISK_ROOT/build/guest
command -v qemu-system-x86_64 > /dev/null || { fail "qemu-system-x86_64 is installed"; exit 0; }
if ! out=$("$VDISK_ROOT/tests/guest/build.sh" "$G" 2>&1); then fail "build the test VM" "$out"; exit 0; fi
"$G/guest_io" --expect "$T/expect.raw"
truncate -s 64M "$T/vm.raw"
SOCK=$T/vm.sock

start_vdiskd() {    # the dead one's image lock may linger a moment: retry
    for _ in $(seq 100); do
        "$VDISKD" --nbd "unix:$T/nbd.sock" \
            --export "type=vhost-user-blk,name=vm,file=$T/vm.raw,format=raw,socket=$SOCK,num-queues=2,serial=vdisk-vm" \
            2>> "$T/serve.log" &
        D=$!
        for _ in $(seq 100); do
            [ -S "$SOCK" ] && grep -q "export 'vm' added" "$T/serve.log" 2>/dev/null && { on_exit "kill $D 2>/dev/null"; return 0; }
            kill -0 $D 2>/dev/null || break
            sleep 0.05
        done
        wait $D 2>/dev/null; sleep 0.05
    done
    return 1
}
wait_console() {    # PATTERN SECONDS
    for _ in $(seq $(($2 * 10))); do grep -q "$1" "$T/console" 2>/dev/null && return 0; kill -0 $Q 2>/dev/null || return 1; sleep 0.1; done
    return 1
}

start_vdiskd
timeout 400 qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem -cpu max -smp 2 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -chardev socket,id=c0,path="$SOCK",reconnect=1 -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
    -kernel "$G/vmlinuz" -initrd "$G/initramfs.gz" \
    -append "console=ttyS0 panic=-1 quiet vdserial=vdisk-vm vdpasses=5" \
    -nodefaults -display none -serial file:"$T/console" -no-reboot > "$T/qemu.log" 2>&1 &
Q=$!
on_exit "kill $Q 2>/dev/null"
restarts=0
for pass in 1 3; do
    if wait_console "^PASS $pass " 200; then
        kill -9 $D; wait $D 2>/dev/null
        rm -f "$SOCK"
        sleep 0.3
        start_vdiskd && restarts=$((restarts + 1))
    fi
done
wait $Q; rc=$?
grep -E 'GUEST-|^PASS' "$T/console" | tr -d '\r' | sed 's/^/# /'
grep -E 'resubmitted|signalled completions' "$T/serve.log" | sed 's/^/# /'
if [ $restarts -eq 2 ]; then ok "vdiskd killed and restarted twice during the guest's passes"
else fail "vdiskd killed and restarted twice during the guest's passes" "restarts: $restarts; $(tail -3 "$T/console" | tr '\n' ' ')"; fi
if [ $rc -eq 0 ] && grep -q '^GUEST-OK' "$T/console"; then ok "guest: every pass verified across the restarts"
else
    fail "guest: every pass verified across the restarts" "qemu rc $rc: $(tail -q -n 5 "$T/console" "$T/qemu.log" | tr '\n' ' ')"
    tail -40 "$T/serve.log" | sed 's/^/# serve: /'
fi
kill $D 2>/dev/null; wait $D 2>/dev/null
check "image content as expected (qemu-img compare)" qemu-img compare -f raw -F raw "$T/expect.raw" "$T/vm.raw"
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve.log"; then
    fail "vdiskd: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve.log")"
else ok "vdiskd: no sanitizer report"; fi
