#!/usr/bin/env bash
# vdisk import: an OVA (tar of an OVF descriptor and streamOptimized VMDKs)
# into qcow2 / raw / vhd, capacities reported from the OVF; a lone VMDK or
# VHD imports like convert; broken archives give clear errors.
source "$(dirname "$0")/../lib.sh"

mkdir -p "$T/ova"
"$VDISK" create -q -f raw "$T/d1.raw" 24M
"$VDISK" io -f raw -c "write -P 0x11 0 1M" -c "write -P 0x12 20M 64k" "$T/d1.raw" >/dev/null
"$VDISK" create -q -f raw "$T/d2.raw" 8M
"$VDISK" io -f raw -c "write -P 0x21 4M 4k" "$T/d2.raw" >/dev/null
"$VDISK" convert -f raw -c -O vmdk -o subformat=streamOptimized "$T/d1.raw" "$T/ova/vm-disk1.vmdk"
qemu-img convert -O vmdk -o subformat=streamOptimized "$T/d2.raw" "$T/ova/vm-disk2.vmdk"
s1=$(stat -c %s "$T/ova/vm-disk1.vmdk"); s2=$(stat -c %s "$T/ova/vm-disk2.vmdk")
cat > "$T/ova/vm.ovf" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="vm-disk1.vmdk" ovf:id="file1" ovf:size="$s1"/>
    <File ovf:href="vm-disk2.vmdk" ovf:id="file2" ovf:size="$s2"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="24" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1"
      ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
      ovf:populatedSize="1114112"/>
    <Disk ovf:capacity="8388608" ovf:diskId="vmdisk2" ovf:fileRef="file2"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A VM</Info><Name>vm</Name></VirtualSystem>
</Envelope>
EOF
(cd "$T/ova" && tar --format=ustar -cf "$T/vm.ova" vm.ovf vm-disk1.vmdk vm-disk2.vmdk)

out=$("$VDISK" import -O qcow2 "$T/vm.ova" "$T/vm.qcow2" 2>&1); rc=$?
[ $rc = 0 ] && ok "import OVA to qcow2" || fail "import OVA to qcow2" "$out"
grep -q "vmdisk1: vm-disk1.vmdk, capacity 24 MiB (25165824 bytes)" <<<"$out" && ok "reports disk 1's OVF capacity" || fail "capacity 1" "$out"
grep -q "vmdisk2: vm-disk2.vmdk, capacity 8 MiB (8388608 bytes)" <<<"$out" && ok "reports disk 2's OVF capacity" || fail "capacity 2" "$out"
check "disk 1 content" qemu-img compare -q "$T/vm.qcow2" -F raw "$T/d1.raw"
check "disk 2 content (OUT-2)" qemu-img compare -q "$T/vm-2.qcow2" -F raw "$T/d2.raw"
check "import OVA to vhd" "$VDISK" import -q -O vhd "$T/vm.ova" "$T/vm.vhd"
check "vhd disk 1 content" qemu-img compare -q -f vpc "$T/vm.vhd" -F raw "$T/d1.raw"
j=$("$VDISK" import -O raw --output=json "$T/vm.ova" "$T/vm.raw")
[ "$(jq '.disks[0].capacity' <<<"$j")" = 25165824 ] && [ "$(jq '.disks[0]."populated-size"' <<<"$j")" = 1114112 ] \
    && ok "JSON report with capacity and populated size" || fail "JSON report" "$j"
check "raw disk 1 content" cmp "$T/vm.raw" "$T/d1.raw"
check "lone VMDK imports like convert" "$VDISK" import -O qcow2 "$T/ova/vm-disk2.vmdk" "$T/lone.qcow2"
check "lone VMDK content" qemu-img compare -q "$T/lone.qcow2" -F raw "$T/d2.raw"
"$VDISK" convert -f raw -O vhd "$T/d2.raw" "$T/lone.vhd"
check "lone VHD imports" "$VDISK" import -O vmdk "$T/lone.vhd" "$T/lone.vmdk"
check "lone VHD content" qemu-img compare -q "$T/lone.vmdk" -F raw "$T/d2.raw"

# broken archives
sed 's/ovf:capacity="24"/ovf:capacity="25"/' "$T/ova/vm.ovf" > "$T/ova/bad.ovf"
(cd "$T/ova" && mv vm.ovf good.ovf && cp bad.ovf vm.ovf && tar --format=ustar -cf "$T/cap.ova" vm.ovf vm-disk1.vmdk vm-disk2.vmdk && mv good.ovf vm.ovf)
check_fails "capacity that disagrees with the image" "$VDISK" import -O raw "$T/cap.ova" "$T/cap.raw"
(cd "$T/ova" && tar --format=ustar -cf "$T/nodisk.ova" vm.ovf vm-disk1.vmdk)
out=$("$VDISK" import -O raw "$T/nodisk.ova" "$T/nd.raw" 2>&1)
[ $? != 0 ] && grep -q "vm-disk2.vmdk, which is not in the archive" <<<"$out" && ok "missing disk file named" || fail "missing disk" "$out"
(cd "$T/ova" && tar --format=ustar -cf "$T/noovf.ova" vm-disk1.vmdk)
check_fails "archive without an OVF" "$VDISK" import -O raw "$T/noovf.ova" "$T/x.raw"
head -c 3000 "$T/vm.ova" > "$T/trunc.ova"
check_fails "truncated archive" "$VDISK" import -O raw "$T/trunc.ova" "$T/x.raw"
printf 'not a tar at all' > "$T/junk.ova"
check_fails "not a tar" "$VDISK" import -O raw "$T/junk.ova" "$T/x.raw"
ls "$T"/.vdisk-import-* >/dev/null 2>&1 && fail "temporary files left behind" || ok "no temporary files left behind"
