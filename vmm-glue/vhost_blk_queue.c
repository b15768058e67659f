/* vhost-user-blk: one virtqueue on its loop thread. Requests are parsed
 * from the chain, checked, and submitted to the disk with iovecs pointing
 * into guest memory; completions write the status byte, return the chain
 * and signal the call eventfd. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include "vdisk/error.h"
#include "vmm-glue/vhost_blk_int.h"

#define STAT_ADD(f, v) __atomic_add_fetch(&(f), (v), __ATOMIC_RELAXED)

static void process(struct vhb_queue *q);

/* ---- control-thread hand-offs ---- */

struct call {
    struct vhb_queue *q;
    void (*fn)(struct call *c);
    void *arg;
    int iarg;
    int rc;
    sem_t done;
};

static void call_trampoline(void *opaque)
{
    struct call *c = opaque;
    c->fn(c);
    if (c->fn) sem_post(&c->done);   /* fn clears c->fn to post later itself */
}

static int run_on_queue(struct vhb_queue *q, void (*fn)(struct call *), void *arg, int iarg)
{
    struct call c = { .q = q, .fn = fn, .arg = arg, .iarg = iarg };
    sem_init(&c.done, 0, 0);
    vd_loop_post(q->loop, call_trampoline, &c);
    while (sem_wait(&c.done) < 0 && errno == EINTR) {}
    sem_destroy(&c.done);
    return c.rc;
}

static void notify(struct vhb_queue *q)
{
    if (q->in_process) { q->notify_pending = true; return; }
    if (q->call_fd >= 0 && virtq_should_notify(&q->vq))
        eventfd_write(q->call_fd, 1);
}

static void notify_timer_cb(void *opaque)
{
    struct vhb_queue *q = opaque;
    q->notify_timer = 0;
    notify(q);
}

/* Completions arrive in batches (all the I/O engine reaps at once): signal
 * the driver once, when the loop has dispatched the whole batch (a 0 ms
 * timer runs after this iteration's callbacks), not once per completion.
 * A driver that is quick to re-arm would otherwise be woken for every
 * request and take them back one at a time. */
static void notify_later(struct vhb_queue *q)
{
    if (q->in_process) { q->notify_pending = true; return; }
    if (!q->notify_timer) q->notify_timer = vd_loop_timer(q->loop, 0, notify_timer_cb, q);
}

/* Cancel a deferred signal and send it now (before the ring stops). */
static void notify_flush(struct vhb_queue *q)
{
    if (q->notify_timer) {
        vd_loop_cancel_timer(q->loop, q->notify_timer);
        q->notify_timer = 0;
        q->notify_pending = true;
    }
    if (q->notify_pending) {
        q->notify_pending = false;
        notify(q);
    }
}

static void report_broken(struct vhb_queue *q, const char *why)
{
    if (q->broken_reported) return;
    q->broken_reported = true;
    fprintf(stderr, "vdisk: vhost-user-blk %s: queue %u: %s; queue stopped\n",
            q->b->path, q->index, why);
    if (q->err_fd >= 0) eventfd_write(q->err_fd, 1);
}

/* ---- requests ---- */

static void complete(struct vhb_req *r, uint8_t status)
{
    struct vhb_queue *q = r->q;
    if (r->status) *r->status = status;
    if (q->vq.log) {          /* migration: mark what the device wrote */
        vhu_log_iov(q->vq.log, r->mt, r->iov + r->nout, r->niov - r->nout);
        if (r->status) vhu_log_host(q->vq.log, r->mt, r->status, 1);
    }
    if (status != VIRTIO_BLK_S_OK) STAT_ADD(q->st_errors, 1);
    virtq_push(&q->vq, r->head, r->used_len);
    vhu_mtab_unref(r->mt);
    r->mt = NULL;
    r->busy = false;
    q->inflight--;
    notify_later(q);
    if (q->stopping && q->inflight == 0 && q->drained) {
        sem_t *s = q->drained;
        q->drained = NULL;
        sem_post(s);
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void req_done(struct vd_req *vr, int res)
{
    struct vhb_req *r = vr->opaque;
    const struct vd_vhost_blk_opts *o = &r->q->b->o;
    if (o->stat)
        o->stat(o->stat_opaque, vr->op, vr->op == VD_OP_READ || vr->op == VD_OP_WRITE ? vr->len : 0,
                now_ns() - r->t0, res);
    complete(r, res == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR);
}

/* Hand a parsed request to the disk. */
static void submit(struct vhb_queue *q, struct vhb_req *r)
{
    if (q->b->o.stat) r->t0 = now_ns();
    vd_disk_submit(q->b->disk, &r->vr);
}

/* Find the last device-writable byte (the status) and cut it off the
 * writable iovecs. */
static uint8_t *take_status(struct vhb_req *r, struct virtq_chain *c)
{
    if (c->niov == c->nout || c->in_len == 0) return NULL;
    struct iovec *last = &c->iov[c->niov - 1];
    uint8_t *s = (uint8_t *)last->iov_base + last->iov_len - 1;
    last->iov_len--;
    if (last->iov_len == 0) c->niov--;
    c->in_len--;
    return s;
}

/* Drop the first n readable bytes (the request header) in place. */
static void skip_out(struct virtq_chain *c, uint64_t n, unsigned *first)
{
    unsigned i = 0;
    while (n && i < c->nout) {
        if (n >= c->iov[i].iov_len) { n -= c->iov[i].iov_len; i++; continue; }
        c->iov[i].iov_base = (char *)c->iov[i].iov_base + n;
        c->iov[i].iov_len -= n;
        n = 0;
    }
    *first = i;
}

static bool range_ok(struct vhb_queue *q, uint64_t sector, uint64_t bytes)
{
    uint64_t size = vd_disk_size(q->b->disk), off;
    if (sector > UINT64_MAX / VIRTIO_BLK_SECTOR) return false;
    off = sector * VIRTIO_BLK_SECTOR;
    return off <= size && bytes <= size - off;
}

static void handle(struct vhb_queue *q, uint16_t head)
{
    struct vhb_req *r = &q->reqs[head];
    struct vd_vhost_blk *b = q->b;
    struct virtq_chain c;
    struct virtio_blk_outhdr h;
    unsigned first;

    if (r->busy) {            /* the driver offered a chain we still own */
        q->vq.broken = true;
        report_broken(q, "a descriptor head was made available twice");
        return;
    }
    r->busy = true;
    r->head = head;
    r->q = q;
    r->mt = vhu_mtab_ref(q->mt);
    r->status = NULL;
    r->used_len = 0;
    r->nout = r->niov = 0;
    q->inflight++;
    STAT_ADD(q->st_requests, 1);

    c.iov = r->iov;
    c.cap = VHB_IOV_CAP;
    int bad = virtq_map_chain(&q->vq, head, &c);
    r->status = bad < 0 && c.status ? c.status : take_status(r, &c);
    r->nout = c.nout;
    r->niov = c.niov;
    if (r->status) r->used_len = 1;
    if (bad < 0 || !r->status || c.out_len < sizeof(h)) {
        complete(r, VIRTIO_BLK_S_IOERR);
        return;
    }
    virtq_iov_copy_from(c.iov, c.nout, 0, &h, sizeof(h));
    skip_out(&c, sizeof(h), &first);
    uint64_t out_data = c.out_len - sizeof(h);
    struct vd_req *vr = &r->vr;
    memset(vr, 0, sizeof(*vr));
    vr->done = req_done;
    vr->opaque = r;

    switch (h.type) {
    case VIRTIO_BLK_T_IN:
        if (out_data || c.in_len % VIRTIO_BLK_SECTOR || !range_ok(q, h.sector, c.in_len))
            break;
        vr->op = VD_OP_READ;
        vr->off = h.sector * VIRTIO_BLK_SECTOR;
        vr->len = c.in_len;
        vr->iov = c.iov + c.nout;
        vr->iovcnt = c.niov - c.nout;
        r->used_len += c.in_len;
        STAT_ADD(q->st_reads, 1);
        STAT_ADD(q->st_bytes_read, c.in_len);
        if (vr->len == 0) { complete(r, VIRTIO_BLK_S_OK); return; }
        submit(q, r);
        return;
    case VIRTIO_BLK_T_OUT:
        if (b->o.readonly || c.in_len || out_data % VIRTIO_BLK_SECTOR ||
            !range_ok(q, h.sector, out_data))
            break;
        vr->op = VD_OP_WRITE;
        vr->flags = __atomic_load_n(&b->wce, __ATOMIC_RELAXED) ? 0 : VD_REQ_FUA;
        vr->off = h.sector * VIRTIO_BLK_SECTOR;
        vr->len = out_data;
        vr->iov = c.iov + first;
        vr->iovcnt = c.nout - first;
        STAT_ADD(q->st_writes, 1);
        STAT_ADD(q->st_bytes_written, out_data);
        if (vr->len == 0) { complete(r, VIRTIO_BLK_S_OK); return; }
        submit(q, r);
        return;
    case VIRTIO_BLK_T_FLUSH:
        vr->op = VD_OP_FLUSH;
        STAT_ADD(q->st_flushes, 1);
        submit(q, r);
        return;
    case VIRTIO_BLK_T_GET_ID: {
        uint64_t n = c.in_len < VIRTIO_BLK_ID_BYTES ? c.in_len : VIRTIO_BLK_ID_BYTES;
        virtq_iov_copy_to(c.iov + c.nout, c.niov - c.nout, 0, b->serial, n);
        r->used_len += n;
        complete(r, VIRTIO_BLK_S_OK);
        return;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
        struct virtio_blk_dwz_seg s;
        bool wz = h.type == VIRTIO_BLK_T_WRITE_ZEROES;
        if (b->o.readonly) break;
        /* we advertise one segment per request */
        if (out_data != sizeof(s) || c.in_len) break;
        virtq_iov_copy_from(c.iov + first, c.nout - first, 0, &s, sizeof(s));
        if (s.flags & ~(uint32_t)(wz ? VIRTIO_BLK_WZ_F_UNMAP : 0)) {
            complete(r, VIRTIO_BLK_S_UNSUPP);
            return;
        }
        if (s.num_sectors > VHB_MAX_DWZ_SECTORS ||
            !range_ok(q, s.sector, (uint64_t)s.num_sectors * VIRTIO_BLK_SECTOR))
            break;
        vr->op = wz ? VD_OP_WRITE_ZEROES : VD_OP_DISCARD;
        vr->flags = wz && (s.flags & VIRTIO_BLK_WZ_F_UNMAP) ? VD_REQ_MAY_UNMAP : 0;
        vr->off = s.sector * VIRTIO_BLK_SECTOR;
        vr->len = (uint64_t)s.num_sectors * VIRTIO_BLK_SECTOR;
        STAT_ADD(*(wz ? &q->st_wz : &q->st_discards), 1);
        if (vr->len == 0) { complete(r, VIRTIO_BLK_S_OK); return; }
        submit(q, r);
        return;
    }
    default:
        complete(r, VIRTIO_BLK_S_UNSUPP);
        return;
    }
    complete(r, VIRTIO_BLK_S_IOERR);
}

/* Drain the avail ring. The requests are pushed to the kernel every
 * submit_batch requests rather than all at the end: a front-end resubmits
 * a whole batch of completions at once (32 at QD32), and one io_uring_enter
 * for all of them holds the device idle until the last is prepared, then
 * hands it 32 requests that complete together, so the next batch is as
 * large: the queue moves as one convoy. Measured on a virtio disk, 4 KiB
 * QD32 on one queue (bench/RESULTS.md, "Latency round"): randwrite +50 %,
 * randread +15 %, for a few more syscalls. */
static void process(struct vhb_queue *q)
{
    uint16_t head;
    int rc;
    uint32_t n = 0, batch = q->b->o.submit_batch;

    if (!q->mt || !q->q_enabled || q->stopping || q->vq.broken) return;
    q->in_process = true;
    do {
        while ((rc = virtq_pop(&q->vq, &head)) > 0) {
            handle(q, head);
            if (q->vq.broken) break;
            if (++n == batch) {
                vd_loop_flush(q->loop);
                n = 0;
            }
        }
        if (rc < 0 || q->vq.broken) {
            report_broken(q, "the driver broke the ring (bad available index or head)");
            break;
        }
    } while (virtq_arm(&q->vq));
    q->in_process = false;
    if (q->notify_pending) {
        q->notify_pending = false;
        notify(q);
    }
}

static void on_kick(struct vd_loop *loop, int fd, uint32_t events, void *opaque)
{
    eventfd_t v;
    if (eventfd_read(fd, &v) < 0 && errno != EAGAIN) return;
    process(opaque);
}

/* ---- start / stop ---- */

static void do_start(struct call *c)
{
    struct vhb_queue *q = c->q;
    struct vhb_start *s = c->arg;
    uint16_t *heads = NULL;
    int n = 0;

    q->reqs = calloc(q->num, sizeof(*q->reqs));
    if (q->num) heads = calloc(q->num, sizeof(*heads));
    if (!q->reqs || !heads ||
        virtq_init(&q->vq, q->num, s->desc, s->avail, s->used, s->mt, s->event_idx, s->base) < 0) {
        c->rc = -EINVAL;
        goto fail;
    }
    n = virtq_inflight_attach(&q->vq, s->inflight, q->b->features, heads, q->num);
    if (n < 0) {
        c->rc = vd_err(-EIO, "queue %u: inflight region is inconsistent", q->index);
        goto fail;
    }
    q->vq.log = s->log;
    q->vq.log_used = s->log_used;
    q->vq.log_used_gpa = s->log_used_gpa;
    q->mt = s->mt;
    s->mt = NULL;
    q->inflight = 0;
    q->stopping = false;
    q->broken_reported = false;
    q->drained = NULL;
    if (vd_loop_add_fd(q->loop, q->kick_fd, EPOLLIN, on_kick, q) < 0) {
        vhu_mtab_unref(q->mt);
        q->mt = NULL;
        c->rc = -EIO;
        goto fail;
    }
    /* A back-end that died (or was stopped) after returning chains in the
     * used ring but before signalling them leaves the driver waiting for
     * an interrupt; nothing in flight and nothing new to take means none
     * would ever come. Signal now if the driver's request for one is due. */
    if (q->call_fd >= 0 && virtq_restart_should_notify(&q->vq)) {
        eventfd_write(q->call_fd, 1);
        s->owed_signal = s->event_idx;
    }
    /* Chains a previous back-end process had taken but not returned. */
    if (n > 0) {
        q->in_process = true;
        for (int i = 0; i < n && !q->vq.broken; i++) handle(q, heads[i]);
        q->in_process = false;
        if (q->notify_pending) { q->notify_pending = false; notify(q); }
    }
    free(heads);
    process(q);
    c->rc = n;
    return;
fail:
    free(heads);
    free(q->reqs);
    q->reqs = NULL;
}

int vhb_queue_start(struct vhb_queue *q, struct vhb_start *s)
{
    q->q_enabled = q->enabled;
    int rc = run_on_queue(q, do_start, s, 0);
    vhu_mtab_unref(s->mt);     /* not taken on failure */
    s->mt = NULL;
    return rc;
}

static void do_stop(struct call *c)
{
    struct vhb_queue *q = c->q;
    vd_loop_del_fd(q->loop, q->kick_fd);
    q->stopping = true;
    if (q->inflight) {
        /* completes later: complete() posts when the last one is done */
        q->drained = &c->done;
        c->fn = NULL;
    }
}

static void do_stop_finish(struct call *c)
{
    struct vhb_queue *q = c->q;
    notify_flush(q);
    c->rc = q->vq.last_avail;
    vhu_mtab_unref(q->mt);
    q->mt = NULL;
    free(q->reqs);
    q->reqs = NULL;
}

uint16_t vhb_queue_stop(struct vhb_queue *q)
{
    run_on_queue(q, do_stop, NULL, 0);
    return (uint16_t)run_on_queue(q, do_stop_finish, NULL, 0);
}

static void do_set_call(struct call *c)
{
    c->q->call_fd = c->iarg;
    /* a new call fd may have missed a signal: send one */
    if (c->q->call_fd >= 0) eventfd_write(c->q->call_fd, 1);
}

void vhb_queue_set_call(struct vhb_queue *q, int fd)
{
    run_on_queue(q, do_set_call, NULL, fd);
}

static void do_set_err(struct call *c)
{
    c->q->err_fd = c->iarg;
}

void vhb_queue_set_err(struct vhb_queue *q, int fd)
{
    run_on_queue(q, do_set_err, NULL, fd);
}

static void do_set_enabled(struct call *c)
{
    c->q->q_enabled = c->iarg;
    if (c->iarg) process(c->q);
}

void vhb_queue_set_enabled(struct vhb_queue *q, bool on)
{
    run_on_queue(q, do_set_enabled, NULL, on);
}

static void do_set_log(struct call *c)
{
    struct vhb_start *s = c->arg;
    c->q->vq.log = s->log;
    c->q->vq.log_used = s->log_used;
    c->q->vq.log_used_gpa = s->log_used_gpa;
}

void vhb_queue_set_log(struct vhb_queue *q, struct vhu_log *log, bool used, uint64_t used_gpa)
{
    struct vhb_start s = { .log = log, .log_used = used, .log_used_gpa = used_gpa };
    run_on_queue(q, do_set_log, &s, 0);
}

static void do_set_mem(struct call *c)
{
    struct vhb_queue *q = c->q;
    struct vhb_start *s = c->arg;
    vhu_mtab_unref(q->mt);
    q->mt = s->mt;
    s->mt = NULL;
    q->vq.mt = q->mt;
    if (!s->desc || !s->avail || !s->used) {
        q->vq.broken = true;
        report_broken(q, "the ring is outside the new memory table");
        return;
    }
    q->vq.desc = s->desc;
    q->vq.avail = s->avail;
    q->vq.used = s->used;
    process(q);
}

void vhb_queue_set_mem(struct vhb_queue *q, struct vhb_start *s)
{
    run_on_queue(q, do_set_mem, s, 0);
}
