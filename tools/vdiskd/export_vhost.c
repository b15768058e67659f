/* vdiskd export type "vhost-user-blk": serves an export's disk to one
 * vhost-user front-end (a VM) on a unix socket:
 *   --export type=vhost-user-blk,name=N,file=F,socket=PATH[,num-queues=N]
 *            [,threads=N][,serial=S][,logical-block-size=512|4096][,submit-batch=N]
 *            [,format=..][,cache=..]
 *   submit-batch: requests taken from a queue between two submissions to
 *   the kernel (default 4; 0: all of them, one submission per wake-up)
 * The back-end itself is vmm-glue/vhost_blk.c. Control command:
 *   vhost-user-blk-resize {"name": N, "size": BYTES}: resize the export's
 *   disk and tell the front-end (a config change the guest sees at once). */
#include <errno.h>
#include <string.h>
#include "vdisk/control.h"
#include "vdisk/error.h"
#include "vdisk/export.h"
#include "vdisk/engine.h"
#include "vmm-glue/vhost_blk.h"

static void stat_cb(void *opaque, enum vd_op op, uint64_t bytes, uint64_t ns, int res)
{
    static const enum vd_stat_op map[] = {
        [VD_OP_READ] = VD_STAT_READ, [VD_OP_WRITE] = VD_STAT_WRITE, [VD_OP_FLUSH] = VD_STAT_FLUSH,
        [VD_OP_DISCARD] = VD_STAT_DISCARD, [VD_OP_WRITE_ZEROES] = VD_STAT_WRITE_ZEROES,
    };
    if ((unsigned)op < sizeof(map) / sizeof(map[0]))
        vd_export_stat(opaque, map[op], bytes, ns, res);
}

static int vhost_start(struct vd_export *e)
{
    struct vd_vhost_blk_opts o = { .readonly = e->readonly, .stat = stat_cb, .stat_opaque = e };
    uint64_t nq = 1, threads = 0, lbs = 512, batch = 4;
    const char *sock = vd_opts_get(&e->opts, "socket"), *s;
    int r;
    if (!sock || !sock[0])
        return vd_err(-EINVAL, "type=vhost-user-blk needs socket=PATH");
    if ((r = vd_opts_get_u64(&e->opts, "num-queues", &nq)) < 0 ||
        (r = vd_opts_get_u64(&e->opts, "threads", &threads)) < 0 ||
        (r = vd_opts_get_size(&e->opts, "logical-block-size", &lbs)) < 0 ||
        (r = vd_opts_get_u64(&e->opts, "submit-batch", &batch)) < 0)
        return r;
    if (batch > 1024)
        return vd_err(-EINVAL, "submit-batch=%llu: expected 0 to 1024", (unsigned long long)batch);
    if (nq < 1 || nq > 64)
        return vd_err(-EINVAL, "num-queues=%llu: expected 1 to 64", (unsigned long long)nq);
    if (threads > 64)
        return vd_err(-EINVAL, "threads=%llu: expected at most 64", (unsigned long long)threads);
    if (lbs != 512 && lbs != 4096)
        return vd_err(-EINVAL, "logical-block-size=%llu: expected 512 or 4096", (unsigned long long)lbs);
    if ((s = vd_opts_get(&e->opts, "aio")) && (r = vd_aio_parse(s, &o.aio)) < 0)
        return r;
    /* the serial the guest sees (/sys/block/vdX/serial): up to 20 bytes */
    char serial[21];
    s = vd_opts_get(&e->opts, "serial");
    snprintf(serial, sizeof(serial), "%s", s ? s : e->name);
    o.serial = serial;
    o.num_queues = nq;
    o.nthreads = threads;
    o.logical_block_size = lbs;
    o.submit_batch = batch ? (uint32_t)batch : UINT32_MAX;
    struct vd_vhost_blk *b;
    if ((r = vd_vhost_blk_new(e->disk, sock, &o, &b)) < 0)
        return r;
    e->priv = b;
    vd_log(VD_LOG_INFO, "export '%s': vhost-user-blk on %s, %llu queue%s", e->name, sock,
           (unsigned long long)nq, nq > 1 ? "s" : "");
    return 0;
}

/* Drops the front-end after its requests in flight are done. */
static void vhost_stop(struct vd_export *e)
{
    vd_vhost_blk_free(e->priv);
    e->priv = NULL;
}

static void vhost_stats(struct vd_export *e, json_t *out)
{
    struct vd_vhost_blk_stats st;
    if (!e->priv)
        return;
    vd_vhost_blk_get_stats(e->priv, &st);
    json_object_set_new(out, "socket", json_string(vd_vhost_blk_socket(e->priv)));
    json_object_set_new(out, "connections", json_integer(st.connected ? 1 : 0));
    json_object_set_new(out, "connections-total", json_integer(st.connections));
    json_t *q = json_array();
    for (unsigned i = 0; i < st.num_queues; i++)
        json_array_append_new(q, json_integer(st.queue_requests[i]));
    json_object_set_new(out, "queue-requests", q);
    json_object_set_new(out, "bad-requests", json_integer(st.errors));
}

static int cmd_resize(json_t *args, json_t **ret)
{
    *ret = NULL;
    return vd_export_resize_cmd("vhost-user-blk-resize", "vhost-user-blk", args);
}

static int vhost_resized(struct vd_export *e)
{
    return e->priv ? vd_vhost_blk_resized(e->priv) : 0;
}

static const struct vd_export_type vhost_type = {
    .name = "vhost-user-blk",
    .start = vhost_start,
    .stop = vhost_stop,
    .stats = vhost_stats,
    .resized = vhost_resized,
};

__attribute__((constructor)) static void register_vhost_type(void)
{
    vd_export_type_register(&vhost_type);
    /* waits for the disk (a cluster round trip on RBD): off the loop */
    vd_control_register_blocking("vhost-user-blk-resize", cmd_resize);
}
