#!/usr/bin/env bash
# NBD over TLS: X.509 (with and without client certificates) and PSK, with
# libnbd (nbds://) and qemu's NBD client; clients without credentials are
# refused when TLS is required.
source "$(dirname "$0")/../lib.sh"
source "$VDISK_ROOT/tests/helpers/nbd_common.bash"

P=$T/pki
mkdir -p "$P" "$T/nocert" "$T/pskdir"
mk() { certtool "$@" >/dev/null 2>&1; }
mk --generate-privkey --outfile "$P/ca-key.pem"
printf 'cn = vdisk test CA\nca\ncert_signing_key\nexpiration_days = 3\n' > "$T/ca.info"
mk --generate-self-signed --load-privkey "$P/ca-key.pem" --template "$T/ca.info" --outfile "$P/ca-cert.pem"
mk --generate-privkey --outfile "$P/server-key.pem"
printf 'organization = vdisk\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3\n' > "$T/server.info"
mk --generate-certificate --load-ca-certificate "$P/ca-cert.pem" --load-ca-privkey "$P/ca-key.pem" \
   --load-privkey "$P/server-key.pem" --template "$T/server.info" --outfile "$P/server-cert.pem"
mk --generate-privkey --outfile "$P/client-key.pem"
printf 'organization = vdisk\ncn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 3\n' > "$T/client.info"
mk --generate-certificate --load-ca-certificate "$P/ca-cert.pem" --load-ca-privkey "$P/ca-key.pem" \
   --load-privkey "$P/client-key.pem" --template "$T/client.info" --outfile "$P/client-cert.pem"
cp "$P/ca-cert.pem" "$T/nocert/"     # a client that trusts the server but has no certificate
psktool -u alice -p "$T/pskdir/keys.psk" >/dev/null 2>&1
psktool -u mallory -p "$T/wrong.psk" >/dev/null 2>&1
[ -s "$P/server-cert.pem" ] && [ -s "$T/pskdir/keys.psk" ] || { fail "test credentials created"; exit 1; }

truncate -s 32M "$T/disk.raw"
rand_file "$T/blob" 2 seedt
dd if="$T/blob" of="$T/disk.raw" bs=1M seek=4 conv=notrunc status=none
cp "$T/disk.raw" "$T/disk2.raw"
cp "$T/disk.raw" "$T/disk3.raw"

# X.509, TLS required, client certificates verified.
start_vdiskd x --nbd "unix:$T/x.sock" --tls=require --tls-cert "$P/server-cert.pem" \
    --tls-key "$P/server-key.pem" --tls-ca "$P/ca-cert.pem" --tls-verify-peer \
    --export "name=disk,file=$T/disk.raw,format=raw" || exit 1
X="nbds+unix:///disk?socket=$T/x.sock&tls-certificates=$P"
info=$(nbdinfo --json "$X")
jq_is "X.509: nbdinfo over TLS" "$info" '.TLS' true
check "X.509: nbdcopy round trip over TLS" bash -o pipefail -c \
    "nbdcopy '$T/disk2.raw' '$X' && nbdcopy '$X' '$T/out.raw' && cmp '$T/out.raw' '$T/disk2.raw'"
check "X.509: qemu-img convert through qemu's TLS client" bash -o pipefail -c "qemu-img convert \
    --object 'tls-creds-x509,id=tls0,endpoint=client,dir=$P' \
    --image-opts 'driver=nbd,path=$T/x.sock,export=disk,tls-creds=tls0,tls-hostname=localhost' \
    -O raw '$T/out-q.raw' && cmp '$T/out-q.raw' '$T/disk2.raw'"
check_fails "X.509: a client without TLS is refused" nbdinfo --size "nbd+unix:///disk?socket=$T/x.sock"
check_fails "X.509: a client without a certificate is refused" nbdinfo --size \
    "nbds+unix:///disk?socket=$T/x.sock&tls-certificates=$T/nocert"
check_fails "X.509: a client with PSK credentials is refused" nbdinfo --size \
    "nbds+unix://alice@/disk?socket=$T/x.sock&tls-psk-file=$T/pskdir/keys.psk"

# X.509, TLS optional (--tls=on): both kinds of clients.
start_vdiskd o --nbd "unix:$T/o.sock" --tls=on --tls-cert "$P/server-cert.pem" \
    --tls-key "$P/server-key.pem" --export "name=disk,file=$T/disk3.raw,format=raw,readonly=on" || exit 1
check "--tls=on: a plain client is served" nbdinfo --size "nbd+unix:///disk?socket=$T/o.sock"
check "--tls=on: a TLS client (no client certificate needed) is served" \
    bash -o pipefail -c "nbdinfo --json 'nbds+unix:///disk?socket=$T/o.sock&tls-certificates=$T/nocert' | jq -e '.TLS == true'"

# PSK, TLS required.
cp "$T/disk.raw" "$T/disk4.raw"
start_vdiskd p --nbd "unix:$T/p.sock" --tls=require --tls-psk-file "$T/pskdir/keys.psk" \
    --export "name=disk,file=$T/disk4.raw,format=raw" || exit 1
Q="nbds+unix://alice@/disk?socket=$T/p.sock&tls-psk-file=$T/pskdir/keys.psk"
check "PSK: nbdcopy round trip" bash -o pipefail -c "nbdcopy '$Q' '$T/out4.raw' && cmp '$T/out4.raw' '$T/disk4.raw'"
check "PSK: qemu-io through qemu's TLS client" qemu-io \
    --object "tls-creds-psk,id=tls0,endpoint=client,dir=$T/pskdir,username=alice" \
    --image-opts "driver=nbd,path=$T/p.sock,export=disk,tls-creds=tls0" \
    -c 'write -P 0x42 100000 70000' -c 'read -P 0x42 100000 70000'
check_fails "PSK: a wrong key is refused" nbdinfo --size \
    "nbds+unix://mallory@/disk?socket=$T/p.sock&tls-psk-file=$T/wrong.psk"
check_fails "PSK: a client without TLS is refused" nbdinfo --size "nbd+unix:///disk?socket=$T/p.sock"

# Bad TLS configuration is reported, not half-started.
check_fails "--tls=require without credentials" "$VDISKD" --tls=require --nbd "unix:$T/bad.sock" --export "file=$T/disk.raw,format=raw"
check_fails "--tls-cert that does not exist" "$VDISKD" --tls-cert "$T/none.pem" --tls-key "$T/none.pem" --nbd "unix:$T/bad.sock" --export "file=$T/disk.raw,format=raw"
check_fails "--tls-psk-file with junk" bash -o pipefail -c "echo 'alice:xyz' > '$T/junk.psk'; '$VDISKD' --tls-psk-file '$T/junk.psk' --nbd 'unix:$T/bad.sock' --export 'file=$T/disk.raw',format=raw"

for d in x o p; do alive $d "nbd+unix:///disk?socket=$T/o.sock" >/dev/null; stop_vdiskd $d; done
