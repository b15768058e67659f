/* Linux native AIO engine (libaio): a fixed pool of iocbs per loop, each
 * signalling the loop's eventfd on completion; submissions are batched into
 * one io_submit per loop iteration. Filesystems without AIO fsync support
 * get their SYNCs done by the shared worker pool instead. */
#include <errno.h>
#include <libaio.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "vdisk/engine.h"
#include "vdisk/loop.h"
#include "block/engine_int.h"

struct naio {
    io_context_t ctx;
    int efd;
    unsigned depth;
    struct iocb *iocbs;
    struct iocb **free_cbs;
    unsigned nfree;
    struct iocb **batch;            /* prepared, not yet given to io_submit */
    unsigned nbatch;
    unsigned inflight;              /* in the kernel */
    struct vd_io *wait_head, *wait_tail;
    bool no_fsync;                  /* AIO fsync refused here: use workers */
};

static void a_fini(struct vd_engine *e);

static int a_init(struct vd_engine **out, unsigned depth)
{
    struct naio *a = calloc(1, sizeof(*a));
    if (!a)
        return -ENOMEM;
    if (depth < 4)
        depth = 4;
    a->depth = depth;
    a->efd = -1;
    int r = io_setup((int)depth, &a->ctx);
    if (r < 0) {
        free(a);
        return r;
    }
    a->iocbs = calloc(depth, sizeof(*a->iocbs));
    a->free_cbs = calloc(depth, sizeof(*a->free_cbs));
    a->batch = calloc(depth, sizeof(*a->batch));
    a->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!a->iocbs || !a->free_cbs || !a->batch || a->efd < 0) {
        r = a->efd < 0 ? -errno : -ENOMEM;
        a_fini((struct vd_engine *)a);
        return r;
    }
    for (unsigned i = 0; i < depth; i++)
        a->free_cbs[a->nfree++] = &a->iocbs[i];
    *out = (struct vd_engine *)a;
    return 0;
}

static void a_fini(struct vd_engine *e)
{
    struct naio *a = (struct naio *)e;
    if (!a)
        return;
    io_destroy(a->ctx);
    if (a->efd >= 0)
        close(a->efd);
    free(a->iocbs);
    free(a->free_cbs);
    free(a->batch);
    free(a);
}

static int a_event_fd(struct vd_engine *e)
{
    return ((struct naio *)e)->efd;
}

/* ---- SYNC through the worker pool ---- */

static void sync_work(void *opaque)
{
    struct vd_io *io = opaque;
    io->cur_iovcnt = fdatasync(io->file->fd) < 0 ? -errno : 0;
}

static void sync_done(void *opaque)
{
    struct vd_io *io = opaque;
    vd_io_complete(io, io->cur_iovcnt);
}

static void sync_offload(struct vd_io *io)
{
    if (io->loop) {
        vd_loop_offload(io->loop, sync_work, sync_done, io);
    } else {
        sync_work(io);
        sync_done(io);
    }
}

/* ---- submission ---- */

static void prep(struct naio *a, struct iocb *cb, struct vd_io *io)
{
    int fd = io->file ? io->file->fd : -1;
    long long off = (long long)(io->off + io->xfer);
    switch (io->op) {
    case VD_IO_READ:
        io_prep_preadv(cb, fd, io->cur_iov, io->cur_iovcnt, off);
        break;
    case VD_IO_WRITE:
        io_prep_pwritev(cb, fd, io->cur_iov, io->cur_iovcnt, off);
        break;
    default:
        io_prep_fdsync(cb, fd);
        break;
    }
    io_set_eventfd(cb, a->efd);
    cb->data = io;
    a->batch[a->nbatch++] = cb;
}

static void start(struct naio *a, struct vd_io *io)
{
    if (io->op == VD_IO_SYNC && a->no_fsync) {
        sync_offload(io);
        return;
    }
    prep(a, a->free_cbs[--a->nfree], io);
}

static void a_submit(struct vd_engine *e, struct vd_io *io)
{
    struct naio *a = (struct naio *)e;
    vd_io_begin(io);
    if (a->nfree == 0 || a->wait_head) {
        if (a->wait_tail)
            a->wait_tail->next = io;
        else
            a->wait_head = io;
        a->wait_tail = io;
        return;
    }
    start(a, io);
}

static bool fsync_unsupported(int r)
{
    return r == -EINVAL || r == -EOPNOTSUPP;
}

static void a_flush(struct vd_engine *e)
{
    struct naio *a = (struct naio *)e;
    int tries = 0;
    while (a->nbatch) {
        int r = io_submit(a->ctx, (long)a->nbatch, a->batch);
        if (r > 0) {
            a->inflight += (unsigned)r;
            a->nbatch -= (unsigned)r;
            memmove(a->batch, a->batch + r, a->nbatch * sizeof(*a->batch));
            continue;
        }
        if (r == 0)
            r = -EAGAIN;
        if (r == -EAGAIN || r == -EINTR) {
            /* Completions will make room; with nothing in flight, wait a
             * little and try again before giving up on the batch. */
            if (a->inflight > 0)
                return;
            if (++tries < 1000) {
                sched_yield();
                continue;
            }
        }
        /* The first iocb was refused: finish its request with the error
         * and go on with the rest. */
        struct iocb *cb = a->batch[0];
        struct vd_io *io = cb->data;
        a->nbatch--;
        memmove(a->batch, a->batch + 1, a->nbatch * sizeof(*a->batch));
        a->free_cbs[a->nfree++] = cb;
        if (io->op == VD_IO_SYNC && fsync_unsupported(r)) {
            a->no_fsync = true;
            sync_offload(io);
        } else {
            vd_io_complete(io, r);
        }
    }
}

static int a_reap(struct vd_engine *e)
{
    struct naio *a = (struct naio *)e;
    struct io_event ev[64];
    struct timespec zero = { 0, 0 };
    uint64_t cnt;
    int done = 0;
    if (read(a->efd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
        return -errno;
    for (;;) {
        int n = io_getevents(a->ctx, 0, 64, ev, &zero);
        if (n == -EINTR)
            continue;
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            struct iocb *cb = ev[i].obj;
            struct vd_io *io = cb->data;
            long r = (long)ev[i].res;
            int res;
            a->inflight--;
            if (io->op == VD_IO_SYNC && fsync_unsupported((int)r)) {
                a->no_fsync = true;
                a->free_cbs[a->nfree++] = cb;
                sync_offload(io);
                continue;
            }
            if (r == -EINTR || r == -EAGAIN) {
                prep(a, cb, io);
                continue;
            }
            if (!vd_io_advance(io, r, &res)) {
                prep(a, cb, io);    /* the rest of a short transfer */
                continue;
            }
            a->free_cbs[a->nfree++] = cb;
            vd_io_complete(io, res);
            done++;
        }
        if (n < 64)
            break;
    }
    while (a->wait_head && a->nfree > 0) {
        struct vd_io *io = a->wait_head;
        a->wait_head = io->next;
        if (!a->wait_head)
            a->wait_tail = NULL;
        io->next = NULL;
        start(a, io);
    }
    return done;
}

static bool a_busy(struct vd_engine *e)
{
    struct naio *a = (struct naio *)e;
    return a->inflight || a->nbatch || a->wait_head;
}

const struct vd_engine_ops vd_engine_aio = {
    .name = "native",
    .init = a_init,
    .fini = a_fini,
    .event_fd = a_event_fd,
    .submit = a_submit,
    .flush = a_flush,
    .reap = a_reap,
    .busy = a_busy,
};
