# Sourced by the NBD / vdiskd integration tests after tests/lib.sh.
#   start_vdiskd NAME ARGS...  start $VDISKD in the background (log $T/NAME.log),
#                              wait until it is ready (its pidfile exists)
#   stop_vdiskd NAME           SIGTERM, wait, and one TAP line: clean exit and no
#                              sanitizer report in its log
#   PY                         the system python (it has the libnbd module)
PY=/usr/bin/python3
# nbdsh runs on the system python, which has the nbd module.
export PATH=/usr/bin:$PATH
export LIBNBD_DEBUG=${LIBNBD_DEBUG:-0}

start_vdiskd() {
    local name=$1 pid i
    shift
    rm -f "$T/$name.pid"
    "$VDISKD" --pidfile "$T/$name.pid" "$@" 2> "$T/$name.log" &
    pid=$!
    eval "${name}_pid=$pid"
    on_exit "kill $pid 2>/dev/null; wait $pid 2>/dev/null"
    for i in $(seq 200); do
        [ -s "$T/$name.pid" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "# vdiskd $name did not start:"
    sed 's/^/#   /' "$T/$name.log" | head -20
    return 1
}

sanitizer_clean() {   # LOG: no sanitizer report in it
    ! grep -qE 'AddressSanitizer|LeakSanitizer|runtime error:' "$1"
}

stop_vdiskd() {
    local name=$1 pid rc
    pid=$(eval echo "\${${name}_pid}")
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"; rc=$?
    if [ $rc -ne 0 ] || ! sanitizer_clean "$T/$name.log"; then
        fail "vdiskd $name exits cleanly on SIGTERM" "rc $rc: $(grep -m4 -E 'Sanitizer|runtime error|#[0-9]+ |error' "$T/$name.log" | tr '\n' ' ')"
    else
        ok "vdiskd $name exits cleanly on SIGTERM"
    fi
}

# The daemon is still alive and serving: nbdinfo answers on URI.
alive() {   # NAME URI
    local pid
    pid=$(eval echo "\${${1}_pid}")
    kill -0 "$pid" 2>/dev/null && nbdinfo --size "$2" >/dev/null 2>&1
}

# jq_is NAME JSON FILTER EXPECTED: one TAP line comparing jq's answer.
jq_is() {
    local got
    got=$(jq -r "$3" <<<"$2" 2>&1)
    if [ "$got" = "$4" ]; then ok "$1"; else fail "$1" "expected '$4', got '$got'"; fi
}
