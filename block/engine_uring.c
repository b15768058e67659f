/* io_uring engine: one ring per loop. Submissions are queued as SQEs and
 * pushed to the kernel in one io_uring_submit per loop iteration (flush);
 * completions signal an eventfd the loop watches. Requests beyond what the
 * completion queue can hold wait on a list, so the CQ never overflows. */
#include <errno.h>
#include <liburing.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include "vdisk/engine.h"
#include "block/engine_int.h"

struct uring {
    struct io_uring ring;
    int efd;
    unsigned inflight, max_inflight;
    unsigned queued;                 /* SQEs prepared but not yet submitted */
    struct vd_io *wait_head, *wait_tail;
};

static int u_init(struct vd_engine **out, unsigned depth)
{
    struct uring *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    if (depth < 4)
        depth = 4;
    struct io_uring_params p = { 0 };
    int r = io_uring_queue_init_params(depth, &u->ring, &p);
    if (r < 0) {
        free(u);
        return r;
    }
    u->max_inflight = p.cq_entries;
    u->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->efd < 0) {
        r = -errno;
        goto fail;
    }
    r = io_uring_register_eventfd(&u->ring, u->efd);
    if (r < 0) {
        close(u->efd);
        goto fail;
    }
    *out = (struct vd_engine *)u;
    return 0;
fail:
    io_uring_queue_exit(&u->ring);
    free(u);
    return r;
}

static void u_fini(struct vd_engine *e)
{
    struct uring *u = (struct uring *)e;
    if (!u)
        return;
    io_uring_queue_exit(&u->ring);
    close(u->efd);
    free(u);
}

static int u_event_fd(struct vd_engine *e)
{
    return ((struct uring *)e)->efd;
}

static void u_submit_now(struct uring *u)
{
    /* Transient refusals (EAGAIN under memory pressure, EINTR) are retried
     * a bounded number of times; whatever is still in the SQ afterwards is
     * pushed by the next flush. */
    for (int tries = 0; io_uring_sq_ready(&u->ring) > 0 && tries < 1000; tries++) {
        int r = io_uring_submit(&u->ring);
        if (r < 0 && r != -EAGAIN && r != -EBUSY && r != -EINTR)
            break;
        if (r <= 0)
            sched_yield();
    }
    u->queued = io_uring_sq_ready(&u->ring);
}

/* Put io (already begun) in the ring; the caller ensures room. */
static void u_prep(struct uring *u, struct vd_io *io)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe) {
        u_submit_now(u);
        sqe = io_uring_get_sqe(&u->ring);
        if (!sqe) {                 /* cannot happen once the SQ is drained */
            vd_io_complete(io, -EAGAIN);
            return;
        }
    }
    int fd = io->file ? io->file->fd : -1;
    off_t off = (off_t)(io->off + io->xfer);
    switch (io->op) {
    case VD_IO_READ:
        io_uring_prep_readv(sqe, fd, io->cur_iov, (unsigned)io->cur_iovcnt, off);
        break;
    case VD_IO_WRITE:
        io_uring_prep_writev(sqe, fd, io->cur_iov, (unsigned)io->cur_iovcnt, off);
        break;
    default:
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
        break;
    }
    io_uring_sqe_set_data(sqe, io);
    u->inflight++;
    u->queued++;
}

static void u_submit(struct vd_engine *e, struct vd_io *io)
{
    struct uring *u = (struct uring *)e;
    vd_io_begin(io);
    if (u->inflight >= u->max_inflight || u->wait_head) {
        io->next = NULL;
        if (u->wait_tail)
            u->wait_tail->next = io;
        else
            u->wait_head = io;
        u->wait_tail = io;
        return;
    }
    u_prep(u, io);
}

static void u_flush(struct vd_engine *e)
{
    struct uring *u = (struct uring *)e;
    if (u->queued)
        u_submit_now(u);
}

static int u_reap(struct vd_engine *e)
{
    struct uring *u = (struct uring *)e;
    uint64_t cnt;
    int done = 0;
    if (read(u->efd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
        return -errno;
    for (;;) {
        struct io_uring_cqe *cqe;
        if (io_uring_peek_cqe(&u->ring, &cqe) != 0 || !cqe)
            break;
        struct vd_io *io = io_uring_cqe_get_data(cqe);
        int n = cqe->res;
        /* Consume the CQE before running callbacks, which may nest loops. */
        io_uring_cqe_seen(&u->ring, cqe);
        u->inflight--;
        int res;
        if (n == -EINTR || n == -EAGAIN) {
            u_prep(u, io);          /* retry the same attempt */
            continue;
        }
        if (!vd_io_advance(io, n, &res)) {
            u_prep(u, io);          /* the rest of a short transfer */
            continue;
        }
        vd_io_complete(io, res);
        done++;
    }
    while (u->wait_head && u->inflight < u->max_inflight) {
        struct vd_io *io = u->wait_head;
        u->wait_head = io->next;
        if (!u->wait_head)
            u->wait_tail = NULL;
        io->next = NULL;
        u_prep(u, io);
    }
    return done;
}

static bool u_busy(struct vd_engine *e)
{
    struct uring *u = (struct uring *)e;
    return u->inflight || u->wait_head;
}

const struct vd_engine_ops vd_engine_io_uring = {
    .name = "io_uring",
    .init = u_init,
    .fini = u_fini,
    .event_fd = u_event_fd,
    .submit = u_submit,
    .flush = u_flush,
    .reap = u_reap,
    .busy = u_busy,
};
