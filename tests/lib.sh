# Sourced by integration tests: TAP output, temp dirs, peers.
#   ok NAME / fail NAME [why] / check NAME CMD...   (TAP lines)
#   $VDISK, $VDISKD: programs under test (sanitizer build in make check)
#   $T: a fresh temporary folder, removed at exit
set -uo pipefail
VDISK_ROOT=${VDISK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VDISK_BUILD=${VDISK_BUILD:-build/check}
case $VDISK_BUILD in /*) ;; *) VDISK_BUILD=$VDISK_ROOT/$VDISK_BUILD ;; esac
VDISK=$VDISK_BUILD/bin/vdisk
VDISKD=$VDISK_BUILD/bin/vdiskd
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
T=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-test.XXXXXX")
_cleanup_fns=()
on_exit() { _cleanup_fns+=("$*"); }
_run_cleanup() { local f; for f in "${_cleanup_fns[@]}"; do eval "$f" || true; done; rm -rf "$T"; }
trap _run_cleanup EXIT
_n=0
ok()   { _n=$((_n + 1)); echo "ok $_n - $1"; }
fail() { _n=$((_n + 1)); echo "not ok $_n - $1"; [ $# -gt 1 ] && echo "# $2"; return 0; }
# check NAME CMD...: passes when CMD exits 0; shows its output otherwise.
check() {
    local name=$1; shift
    local out
    if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "$(echo "$out" | tail -5 | tr '\n' ' ')"; fi
}
# check_fails NAME CMD...: passes when CMD exits non-zero without a crash
# (sanitizer report, signal) and says something on stderr.
check_fails() {
    local name=$1; shift
    local out rc
    out=$("$@" 2>&1); rc=$?
    if [ $rc -eq 0 ]; then fail "$name" "succeeded but should have failed"
    elif [ $rc -ge 128 ] || grep -qE 'AddressSanitizer|runtime error|LeakSanitizer' <<<"$out"; then fail "$name" "crashed (rc $rc): $(echo "$out" | head -3 | tr '\n' ' ')"
    elif [ -z "$out" ]; then fail "$name" "failed silently"
    else ok "$name"; fi
}
# Deterministic pseudo-random data: rand_file PATH SIZE_MIB SEED
rand_file() { openssl enc -aes-128-ctr -pass "pass:$3" -nosalt -pbkdf2 < <(head -c $(($2 * 1048576)) /dev/zero) > "$1" 2>/dev/null; }
