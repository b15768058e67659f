#!/usr/bin/env bash
# vdiskd serving qcow2 (with a backing chain) and VMDK: what NBD clients
# see (nbdinfo --json, --map for base:allocation and qemu:allocation-depth,
# data) must match qemu-nbd serving the same image.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

qio() { qemu-io "$@" >/dev/null; }
# base.qcow2: data at 0-1M and 8M-9M; top.qcow2 over it: data at 2M-3M,
# zeroes written over 8M-8.5M, and a partial cluster at 4M+100.
qemu-img create -q -f qcow2 "$T/base.qcow2" 64M
qio -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 8M 1M' "$T/base.qcow2"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$T/top.qcow2"
qio -f qcow2 -c 'write -P 3 2M 1M' -c 'write -z 8M 512k' -c 'write -P 4 4194404 1000' "$T/top.qcow2"
qemu-img create -q -f vmdk -o subformat=monolithicSparse "$T/d.vmdk" 64M
qio -f vmdk -c 'write -P 5 1M 2M' -c 'write -P 6 40M 64k' "$T/d.vmdk"

maps() {   # URI: both maps and the JSON summary an NBD client sees
    nbdinfo --map "$1"
    echo ---
    nbdinfo --map=qemu:allocation-depth "$1"
    echo ---
    nbdinfo --json "$1" | jq -c '.exports[0] | {size: ."export-size", ro: .is_read_only, contexts}'
}

for img in top.qcow2 d.vmdk; do
    fmt=${img##*.}
    start_vdiskd v --nbd "unix:$T/v.sock" --export "name=x,file=$T/$img,readonly=on" || exit 1
    maps "nbd+unix:///x?socket=$T/v.sock" > "$T/vd.map"
    nbdcopy "nbd+unix:///x?socket=$T/v.sock" "$T/vd.raw"
    stop_vdiskd v
    qemu-nbd -t -r -A -f "$fmt" -x x -k "$T/q.sock" "$T/$img" 2>"$T/qemu-nbd.log" &
    q=$!
    for i in $(seq 100); do [ -S "$T/q.sock" ] && break; sleep 0.05; done
    maps "nbd+unix:///x?socket=$T/q.sock" > "$T/q.map"
    kill $q; wait $q 2>/dev/null
    if diff -u "$T/q.map" "$T/vd.map" > "$T/map.diff"; then ok "$fmt: block status maps (both contexts) match qemu-nbd's"
    else fail "$fmt: block status maps (both contexts) match qemu-nbd's" "$(head -20 "$T/map.diff" | tr '\n' '|')"; fi
    qemu-img convert -f "$fmt" -O raw "$T/$img" "$T/qemu.raw"
    check "$fmt: data read over NBD equals qemu-img's" cmp "$T/vd.raw" "$T/qemu.raw"
done

# Writes through vdiskd land in the qcow2 top layer; qemu-img check agrees.
start_vdiskd w --nbd "unix:$T/w.sock" --export "name=x,file=$T/top.qcow2" || exit 1
W="nbd+unix:///x?socket=$T/w.sock"
check "qcow2: qemu-io writes over NBD" qemu-io -f raw -c 'write -P 9 5M 1M' -c 'write -P 8 100 5000' -c 'write -z 0 64k' "$W"
check "qcow2: fio verify over NBD" fio --name=q --ioengine=nbd --uri="$W" --rw=randwrite --bs=4k-64k \
    --iodepth=16 --size=8M --offset=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output=/dev/null
nbdcopy "$W" "$T/w.raw"
stop_vdiskd w
check "qcow2: qemu-img check is clean after NBD writes" qemu-img check -q "$T/top.qcow2"
check "qcow2: qemu-img reads what NBD clients read" bash -o pipefail -c "qemu-img convert -O raw '$T/top.qcow2' '$T/q2.raw' && cmp '$T/q2.raw' '$T/w.raw'"
check "qcow2: the backing file is unchanged" bash -o pipefail -c "qemu-io -f qcow2 -r -c 'read -P 1 0 1M' -c 'read -P 2 8M 1M' '$T/base.qcow2' | grep -vq 'Pattern verification failed'"
