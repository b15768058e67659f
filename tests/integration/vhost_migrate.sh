#!/usr/bin/env bash
# Live migration of a VM whose disk is a vdiskd vhost-user-blk export:
# QEMU (TCG) refuses to migrate a vhost-user device whose back-end lacks
# VHOST_F_LOG_ALL / LOG_SHMFD, so a completed migration with the guest's
# I/O running proves the dirty-logging handshake end to end (SET_LOG_BASE
# with its reply, SET_FEATURES with LOG_ALL and SET_VRING_ADDR with
# VHOST_VRING_F_LOG on running rings, both rings stopped and their bases
# returned). The state goes to a file; a second QEMU loads it and connects
# to the same export, which restarts the rings where the first left them.
# How the guest fares after the move is reported but not judged: QEMU
# 7.2's TCG resumes a migrated vhost-user-blk guest into a kernel crash
# about half the time with qemu-storage-daemon as the back-end too (and
# with -cpu max even for its own virtio-blk), so it says nothing about
# vdiskd. The exact pages logged are checked by vhost_lib.sh.
source "$(dirname "$0")/../lib.sh"
G=$VDISK_ROOT/build/guest
command -v qemu-system-x86_64 > /dev/null || { fail "qemu-system-x86_64 is installed"; exit 0; }
if ! out=$("$VDISK_ROOT/tests/guest/build.sh" "$G" 2>&1); then fail "build the test VM" "$out"; exit 0; fi
truncate -s 64M "$T/vm.raw"
"$VDISKD" --nbd "unix:$T/nbd.sock" \
    --export "type=vhost-user-blk,name=vm,file=$T/vm.raw,format=raw,socket=$T/vm.sock,num-queues=2,serial=vdisk-vm" \
    2> "$T/serve.log" &
D=$!
on_exit "kill $D 2>/dev/null"
for _ in $(seq 100); do [ -S "$T/vm.sock" ] && break; sleep 0.05; done

# vm NAME [QEMU ARGS]: the guest repeats write / flush / verify passes
vm() {
    local n=$1; shift
    timeout "${TMO:-120}" qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem -cpu qemu64 -smp 2 -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -chardev socket,id=c0,path="$T/vm.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
        -kernel "$G/vmlinuz" -initrd "$G/initramfs.gz" \
        -append "console=ttyS0 panic=-1 quiet vdserial=vdisk-vm vdpasses=8" \
        -nodefaults -display none -serial file:"$T/$n.console" -no-reboot \
        -qmp unix:"$T/$n.qmp",server=on,wait=off "$@" > "$T/$n.qemu" 2>&1
}
# qmp SOCKET migrate FILE | quit
qmp() {
    python3 - "$@" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try: s.connect(sys.argv[1]); break
    except OSError: time.sleep(0.1)
f = s.makefile("rw"); f.readline()
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
cmd("qmp_capabilities")
if sys.argv[2] == "quit":
    cmd("quit"); sys.exit(0)
cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
r = cmd("migrate", uri="exec:cat > " + sys.argv[3])
if "error" in r: print(r["error"]["desc"]); sys.exit(1)
for _ in range(600):
    r = cmd("query-migrate")["return"]
    if r.get("status") in ("completed", "failed", "cancelled"): break
    time.sleep(0.1)
print(r.get("status"), r.get("error-desc", ""), "dirty syncs", r.get("ram", {}).get("dirty-sync-count"))
sys.exit(0 if r.get("status") == "completed" else 1)
PY
}

vm src &
src=$!
for _ in $(seq 1200); do grep -q '^PASS 1 ' "$T/src.console" 2>/dev/null && break; kill -0 $src 2>/dev/null || break; sleep 0.1; done
check "the guest is writing and verifying on 2 queues" grep -q '^PASS 1 ' "$T/src.console"
if out=$(qmp "$T/src.qmp" migrate "$T/state"); then ok "migrated with I/O running: $out"
else fail "migrated with I/O running" "$out $(tail -3 "$T/src.qemu")"; fi
if grep -q 'Migration disabled' "$T/src.qemu"; then fail "no migration blocker" "$(grep 'Migration disabled' "$T/src.qemu")"
else ok "no migration blocker"; fi
passes_before=$(grep -c '^PASS' "$T/src.console")
qmp "$T/src.qmp" quit; wait $src
TMO=40 vm dst -incoming "exec:cat $T/state" &
dst=$!
wait $dst
grep -E 'GUEST|BUG|virtio_blk' "$T/dst.console" | head -3 | sed 's/^/# destination guest: /'
echo "# destination guest: $(grep -c '^PASS' "$T/dst.console") passes after $passes_before before the move"
check "the destination QEMU loaded the state and ran the guest" test -s "$T/dst.console"
if grep -qi 'vhost' "$T/src.qemu" "$T/dst.qemu"; then fail "QEMU reported no vhost-user error" "$(grep -hi vhost "$T/src.qemu" "$T/dst.qemu" | head -3)"
else ok "QEMU reported no vhost-user error"; fi
kill $D; wait $D 2>/dev/null
if grep -q 'request [0-9]*:\|queue stopped' "$T/serve.log"; then fail "vdiskd refused no message and broke no ring" "$(grep -m3 'request [0-9]*:\|queue stopped' "$T/serve.log")"
else ok "vdiskd refused no message and broke no ring"; fi
if grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' "$T/serve.log"; then
    fail "vdiskd: no sanitizer report" "$(grep -m3 -E 'Sanitizer|runtime error' "$T/serve.log")"
else ok "vdiskd: no sanitizer report"; fi
