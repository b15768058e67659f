# Sourced by the RBD tests after lib.sh. The test registers its cleanup
# (which stops what uses the cluster, then "$CLUSTER" stop "$T/ceph") and
# calls rbd_cluster_up: a throwaway single-node cluster in $T/ceph, or the
# test fails loudly. R IMAGE [OPTS] names an image on it; rbdc runs the rbd
# tool against it.
CLUSTER=$VDISK_ROOT/tests/rbd/cluster.sh
rbd_cluster_up() {
    if ! CONF=$(RBD_CLUSTER_TIMEOUT=90 "$CLUSTER" start "$T/ceph" rbd 2> "$T/cluster.err"); then
        fail "throwaway Ceph cluster starts" "$(tail -n 20 "$T/cluster.err" | tr '\n' ' ')"
        exit 1
    fi
    ok "throwaway Ceph cluster starts"
}
R() { echo "rbd:rbd/$1:conf=$CONF${2:+:$2}"; }
rbdc() { timeout 60 rbd -c "$CONF" "$@"; }
