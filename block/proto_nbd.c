/* The NBD client backend: nbd://, nbds://, nbd+unix://, nbds+unix:// and
 * nbd+vsock:// names are served by a libnbd connection, driven entirely
 * through libnbd's asynchronous API so that no thread blocks per request:
 * data I/O (vd_io) completes through the loop of the thread that submitted
 * it, and the blocking calls (metadata, slow paths) issue the same
 * asynchronous commands and wait for them.
 *
 * One connection may be used from several threads. libnbd must only be
 * told "readable" when a reply really waits in the socket (a read that
 * finds nothing leaves it half-way into a reply, with later commands held
 * back), so every libnbd call that moves the socket runs under io_lock and
 * pump() checks readability with poll() before each notification. Every
 * loop with requests in flight watches the socket edge-triggered, and
 * pump() keeps going until nothing more can be done, so no edge is lost.
 *
 * libnbd runs completion callbacks with its handle lock held and forbids
 * calling it back from there, so a callback only records the result and
 * queues the request; the queue is drained afterwards, on the request's
 * own loop (other loops' requests are posted to them).
 *
 * For a vd_io owned by this backend the engine-private fields hold:
 *   cur_iovcnt  commands still outstanding (plus one while issuing)
 *   xfer        the errno of the first failed command, 0 if none */
#include <errno.h>
#include <libnbd.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include "vdisk/engine.h"
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "vdisk/loop.h"

#define DEFAULT_MAX_REQ (32u << 20)     /* the NBD spec's safe maximum */
#define MAX_ZERO_REQ (1u << 30)

struct watch {
    struct vd_loop *loop;
    int inflight;           /* this loop's requests not yet finished */
};

struct nbdf {
    struct nbd_handle *h;
    uint64_t size;
    uint64_t max_req;
    bool can_flush, can_zero, can_fua, can_fast_zero, meta;

    pthread_mutex_t io_lock;    /* held around libnbd calls that move the socket */
    pthread_mutex_t lock;       /* everything below */
    struct vd_io *done_head, *done_tail;
    struct watch *w;
    int nw, capw;
};

static const char *nerr(void)
{
    const char *e = nbd_get_error();
    return e ? e : "unknown error";
}

static int nerrno(void)
{
    int e = nbd_get_errno();
    return e > 0 ? -e : -EIO;
}

static bool nbd_match(const char *name)
{
    static const char *const prefixes[] = {
        "nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://",
    };
    for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++)
        if (!strncmp(name, prefixes[i], strlen(prefixes[i])))
            return true;
    return false;
}

static int nbd_open_(struct vd_file *f, const char *name, int flags, enum vd_cache cache)
{
    struct nbdf *n = calloc(1, sizeof(*n));
    if (!n)
        return -ENOMEM;
    pthread_mutex_init(&n->lock, NULL);
    pthread_mutex_init(&n->io_lock, NULL);
    int r;
    n->h = nbd_create();
    if (!n->h) {
        r = vd_err(nerrno(), "%s: %s", name, nerr());
        goto fail;
    }
    nbd_set_handle_name(n->h, "vdisk");
    if (nbd_add_meta_context(n->h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
        nbd_connect_uri(n->h, name) < 0) {
        r = vd_err(nerrno(), "%s: could not connect: %s", name, nerr());
        goto fail;
    }
    int64_t size = nbd_get_size(n->h);
    if (size < 0) {
        r = vd_err(nerrno(), "%s: cannot get the export size: %s", name, nerr());
        goto fail;
    }
    n->size = (uint64_t)size;
    if (!(flags & VD_FILE_RDONLY) && nbd_is_read_only(n->h) == 1) {
        r = vd_err(-EROFS, "%s: the NBD export is read-only", name);
        goto fail;
    }
    int64_t max = nbd_get_block_size(n->h, LIBNBD_SIZE_MAXIMUM);
    n->max_req = max > 0 && (uint64_t)max < DEFAULT_MAX_REQ ? (uint64_t)max : DEFAULT_MAX_REQ;
    n->can_flush = nbd_can_flush(n->h) == 1;
    n->can_zero = nbd_can_zero(n->h) == 1;
    n->can_fua = nbd_can_fua(n->h) == 1;
    n->can_fast_zero = nbd_can_fast_zero(n->h) == 1;
    n->meta = nbd_can_meta_context(n->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    f->priv = n;
    f->fd = -1;
    f->align = 1;
    f->direct = false;
    return 0;
fail:
    if (n->h)
        nbd_close(n->h);
    pthread_mutex_destroy(&n->lock);
    pthread_mutex_destroy(&n->io_lock);
    free(n);
    return r;
}

/* ---- watching the socket from loops ---- */

static struct watch *find_watch(struct nbdf *n, struct vd_loop *l)
{
    for (int i = 0; i < n->nw; i++)
        if (n->w[i].loop == l)
            return &n->w[i];
    return NULL;
}

static void drain(struct nbdf *n, struct vd_loop *l);

static bool readable(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR));
}

static bool gone(struct nbdf *n)
{
    return nbd_aio_is_dead(n->h) || nbd_aio_is_closed(n->h);
}

/* Let libnbd do all the socket allows now: send what it has queued, read
 * every reply that has arrived. Called with io_lock held. */
static void pump_locked(struct nbdf *n)
{
    for (;;) {
        int fd = nbd_aio_get_fd(n->h);
        if (fd < 0 || gone(n))
            return;
        bool progress = false;
        unsigned dir = nbd_aio_get_direction(n->h);
        if (dir & LIBNBD_AIO_DIRECTION_WRITE) {
            nbd_aio_notify_write(n->h);     /* harmless when the socket is full */
            progress = nbd_aio_get_direction(n->h) != dir;
            dir = nbd_aio_get_direction(n->h);
        }
        if ((dir & LIBNBD_AIO_DIRECTION_READ) && readable(fd)) {
            nbd_aio_notify_read(n->h);
            progress = true;
        }
        if (!progress)
            return;
    }
}

static void pump(struct nbdf *n)
{
    pthread_mutex_lock(&n->io_lock);
    pump_locked(n);
    pthread_mutex_unlock(&n->io_lock);
}

static void on_socket(struct vd_loop *l, int fd, uint32_t events, void *opaque)
{
    struct nbdf *n = opaque;
    pump(n);
    drain(n, l);
    if (gone(n))
        vd_loop_del_fd(l, fd);      /* every command has failed; stop listening */
}

/* Count a request of loop l in flight, watching the socket on its first. */
static int watch_add(struct nbdf *n, struct vd_loop *l)
{
    int fd = nbd_aio_get_fd(n->h);
    if (fd < 0)
        return -ENOTCONN;
    pthread_mutex_lock(&n->lock);
    struct watch *w = find_watch(n, l);
    if (!w) {
        if (n->nw == n->capw) {
            int cap = n->capw ? n->capw * 2 : 4;
            struct watch *nw = realloc(n->w, (size_t)cap * sizeof(*nw));
            if (!nw) {
                pthread_mutex_unlock(&n->lock);
                return -ENOMEM;
            }
            n->w = nw;
            n->capw = cap;
        }
        w = &n->w[n->nw++];
        *w = (struct watch){ .loop = l };
    }
    bool first = w->inflight++ == 0;
    pthread_mutex_unlock(&n->lock);
    if (first) {
        /* Edge-triggered: every loop with requests in flight hears of
         * every reply and of room to send, whichever thread's call made
         * libnbd wait for it; pump() after each call covers the rest. */
        int r = vd_loop_add_fd(l, fd, EPOLLIN | EPOLLOUT | EPOLLET, on_socket, n);
        if (r < 0 && r != -EEXIST) {
            pthread_mutex_lock(&n->lock);
            w = find_watch(n, l);
            if (--w->inflight == 0)
                *w = n->w[--n->nw];
            pthread_mutex_unlock(&n->lock);
            return r;
        }
    }
    return 0;
}

/* One request of loop l (the calling thread's) has finished. */
static void watch_drop(struct nbdf *n, struct vd_loop *l)
{
    bool last = false;
    pthread_mutex_lock(&n->lock);
    struct watch *w = find_watch(n, l);
    if (w && --w->inflight == 0) {
        last = true;
        *w = n->w[--n->nw];
    }
    pthread_mutex_unlock(&n->lock);
    /* Nothing of this loop's is left in flight: stop watching, so that no
     * loop outlives its registration (loops come and go with threads). */
    if (last)
        vd_loop_del_fd(l, nbd_aio_get_fd(n->h));
}

/* ---- completion ---- */

static void finish(struct vd_io *io)
{
    struct nbdf *n = io->file->priv;
    int res = io->xfer ? -(int)io->xfer : 0;
    watch_drop(n, io->loop);
    io->done(io, res);
}

static void finish_posted(void *opaque)
{
    finish(opaque);
}

static void queue_done(struct nbdf *n, struct vd_io *io)
{
    io->next = NULL;
    if (n->done_tail)
        n->done_tail->next = io;
    else
        n->done_head = io;
    n->done_tail = io;
}

/* Record one command's result; queue the request when it was the last. */
static void part_done(struct nbdf *n, struct vd_io *io, int err)
{
    pthread_mutex_lock(&n->lock);
    if (err && !io->xfer)
        io->xfer = (uint64_t)err;
    if (--io->cur_iovcnt == 0)
        queue_done(n, io);
    pthread_mutex_unlock(&n->lock);
}

static int completion_cb(void *user_data, int *error)
{
    struct vd_io *io = user_data;
    part_done(io->file->priv, io, *error);
    return 1;       /* retire the command */
}

/* Run finished requests: l's own here, the others on their loops. l may be
 * NULL (a blocking call on a thread with no loop of its own). */
static void drain(struct nbdf *n, struct vd_loop *l)
{
    pthread_mutex_lock(&n->lock);
    struct vd_io *io = n->done_head;
    n->done_head = n->done_tail = NULL;
    pthread_mutex_unlock(&n->lock);
    while (io) {
        struct vd_io *next = io->next;
        io->next = NULL;
        if (io->loop == l)
            finish(io);
        else
            vd_loop_post(io->loop, finish_posted, io);
        io = next;
    }
}

/* ---- asynchronous I/O ---- */

static int issue(struct nbdf *n, struct vd_io *io, void *buf, size_t len, uint64_t off)
{
    nbd_completion_callback cb = { .callback = completion_cb, .user_data = io };
    int64_t r;
    if (io->op == VD_IO_READ)
        r = nbd_aio_pread(n->h, buf, len, off, cb, 0);
    else
        r = nbd_aio_pwrite(n->h, buf, len, off, cb, 0);
    return r < 0 ? nerrno() : 0;
}

static void nbd_submit(struct vd_file *f, struct vd_io *io)
{
    struct nbdf *n = f->priv;
    struct vd_loop *l = io->loop;
    io->xfer = 0;
    io->cur_iovcnt = 1;         /* held while issuing */
    io->next = NULL;
    int r = watch_add(n, l);
    if (r < 0) {
        io->done(io, r);
        return;
    }
    pthread_mutex_lock(&n->io_lock);
    if (io->op == VD_IO_SYNC) {
        if (n->can_flush) {
            io->cur_iovcnt++;
            nbd_completion_callback cb = { .callback = completion_cb, .user_data = io };
            if (nbd_aio_flush(n->h, cb, 0) < 0)
                part_done(n, io, -nerrno());
        }
    } else {
        uint64_t off = io->off;
        for (int i = 0; i < io->iovcnt; i++) {
            char *base = io->iov[i].iov_base;
            size_t len = io->iov[i].iov_len;
            while (len > 0) {
                size_t chunk = len < n->max_req ? len : (size_t)n->max_req;
                if (io->op == VD_IO_READ && off + chunk > n->size) {
                    /* past the end of the export: reads as zeros */
                    size_t in = off < n->size ? (size_t)(n->size - off) : 0;
                    memset(base + in, 0, chunk - in);
                    chunk = in;
                    if (!chunk) {
                        off += len;
                        len = 0;
                        break;
                    }
                }
                pthread_mutex_lock(&n->lock);
                io->cur_iovcnt++;
                pthread_mutex_unlock(&n->lock);
                r = issue(n, io, base, chunk, off);
                if (r < 0)
                    part_done(n, io, -r);
                base += chunk;
                off += chunk;
                len -= chunk;
            }
        }
    }
    pump_locked(n);
    pthread_mutex_unlock(&n->io_lock);
    part_done(n, io, 0);        /* release the hold */
    drain(n, l);
}

/* ---- blocking calls: one asynchronous command, then wait ---- */

struct waiter {
    atomic_bool done;
    int err;
};

static int waiter_cb(void *user_data, int *error)
{
    struct waiter *w = user_data;
    w->err = *error;
    atomic_store(&w->done, true);
    return 1;
}

enum sop { S_READ, S_WRITE, S_FLUSH, S_ZERO, S_STATUS };

/* Returns 0, the server's -errno, or (with a message) a local failure. */
static int run_sync(struct vd_file *f, enum sop op, void *buf, uint64_t len, uint64_t off,
                    uint32_t flags, nbd_extent_callback ext)
{
    struct nbdf *n = f->priv;
    struct waiter w = { .done = false };
    nbd_completion_callback cb = { .callback = waiter_cb, .user_data = &w };
    int64_t c = -1;
    pthread_mutex_lock(&n->io_lock);
    switch (op) {
    case S_READ:   c = nbd_aio_pread(n->h, buf, (size_t)len, off, cb, flags); break;
    case S_WRITE:  c = nbd_aio_pwrite(n->h, buf, (size_t)len, off, cb, flags); break;
    case S_FLUSH:  c = nbd_aio_flush(n->h, cb, flags); break;
    case S_ZERO:   c = nbd_aio_zero(n->h, len, off, cb, flags); break;
    case S_STATUS: c = nbd_aio_block_status(n->h, len, off, ext, cb, flags); break;
    }
    if (c < 0) {
        int r = vd_err(nerrno(), "%s: %s", f->name, nerr());
        pthread_mutex_unlock(&n->io_lock);
        return r;
    }
    pump_locked(n);
    pthread_mutex_unlock(&n->io_lock);
    while (!atomic_load(&w.done)) {
        /* Another thread's loop may read our reply; the short timeout
         * bounds how long we sleep on a socket it has already drained. */
        int fd = nbd_aio_get_fd(n->h);
        unsigned dir = nbd_aio_get_direction(n->h);
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (dir & LIBNBD_AIO_DIRECTION_WRITE)
            p.events |= POLLOUT;
        poll(&p, fd >= 0 ? 1 : 0, 20);
        pump(n);
    }
    drain(n, NULL);         /* others' requests finished on the way */
    return w.err ? -w.err : 0;
}

/* A READ or WRITE of len bytes inside the export, as requests of at most
 * the server's maximum size, one after the other; the first failure ends it. */
static int run_chunked(struct vd_file *f, enum sop op, char *p, size_t len, uint64_t off)
{
    struct nbdf *n = f->priv;
    while (len > 0) {
        size_t chunk = len < n->max_req ? len : (size_t)n->max_req;
        int r = run_sync(f, op, p, chunk, off, 0, (nbd_extent_callback){ 0 });
        if (r < 0)
            return vd_err(r, "%s: %s of %zu bytes at offset %llu failed: %s", f->name,
                          op == S_READ ? "read" : "write", chunk, (unsigned long long)off,
                          strerror(-r));
        p += chunk;
        off += chunk;
        len -= chunk;
    }
    return 0;
}

static int nbd_pread_(struct vd_file *f, void *buf, size_t len, uint64_t off)
{
    struct nbdf *n = f->priv;
    size_t in = off >= n->size ? 0 : len < n->size - off ? len : (size_t)(n->size - off);
    int r = run_chunked(f, S_READ, buf, in, off);
    if (r < 0)
        return r;
    if (in < len)
        memset((char *)buf + in, 0, len - in);      /* past the end of the export */
    return 0;
}

static int nbd_pwrite_(struct vd_file *f, const void *buf, size_t len, uint64_t off)
{
    struct nbdf *n = f->priv;
    if (off > n->size || len > n->size - off)
        return vd_err(-ENOSPC, "%s: write of %zu bytes at offset %llu is past the end of the "
                      "export (%llu bytes)", f->name, len, (unsigned long long)off,
                      (unsigned long long)n->size);
    return run_chunked(f, S_WRITE, (char *)buf, len, off);
}

static int nbd_sync_(struct vd_file *f)
{
    struct nbdf *n = f->priv;
    if (!n->can_flush)
        return 0;
    int r = run_sync(f, S_FLUSH, NULL, 0, 0, 0, (nbd_extent_callback){ 0 });
    if (r < 0)
        return vd_err(r, "%s: flush failed: %s", f->name, strerror(-r));
    return 0;
}

static int nbd_size_(struct vd_file *f, uint64_t *size)
{
    *size = ((struct nbdf *)f->priv)->size;
    return 0;
}

static int nbd_truncate_(struct vd_file *f, uint64_t size)
{
    struct nbdf *n = f->priv;
    if (size == n->size)
        return 0;
    return vd_err(-ENOTSUP, "%s: an NBD export cannot be resized (it has %llu bytes, "
                  "%llu wanted)", f->name, (unsigned long long)n->size,
                  (unsigned long long)size);
}

static int zero_range(struct vd_file *f, uint64_t off, uint64_t len, uint32_t flags,
                      const char *what)
{
    struct nbdf *n = f->priv;
    if (!n->can_zero)
        return vd_err(-ENOTSUP, "%s: the NBD server cannot %s", f->name, what);
    if (off > n->size || len > n->size - off)
        return vd_err(-EINVAL, "%s: cannot %s %llu bytes at offset %llu: past the end",
                      f->name, what, (unsigned long long)len, (unsigned long long)off);
    int r = 0;
    while (len > 0 && r == 0) {
        uint64_t chunk = len < MAX_ZERO_REQ ? len : MAX_ZERO_REQ;
        r = run_sync(f, S_ZERO, NULL, chunk, off, flags, (nbd_extent_callback){ 0 });
        if (r < 0)
            r = vd_err(r, "%s: %s at offset %llu failed: %s", f->name, what,
                       (unsigned long long)off, strerror(-r));
        off += chunk;
        len -= chunk;
    }
    return r;
}

/* Deallocate and read as zeros: a write-zeroes that may punch (a plain
 * NBD trim does not promise zeros). */
static int nbd_punch_(struct vd_file *f, uint64_t off, uint64_t len)
{
    return zero_range(f, off, len, 0, "punch");
}

static int nbd_zero_(struct vd_file *f, uint64_t off, uint64_t len)
{
    return zero_range(f, off, len, LIBNBD_CMD_FLAG_NO_HOLE, "write zeroes");
}

struct ext_ctx {
    uint64_t off;
    bool is_data;
    uint64_t end;
    bool got;
};

static int extent_cb(void *user_data, const char *metacontext, uint64_t offset,
                     uint32_t *entries, size_t nr_entries, int *error)
{
    struct ext_ctx *c = user_data;
    if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || c->got)
        return 0;
    /* Merge the leading entries of one kind. A hole is only "no data" when
     * the server also says it reads as zeros. */
    uint64_t pos = offset;
    for (size_t i = 0; i + 1 < nr_entries; i += 2) {
        bool data = !(entries[i + 1] & LIBNBD_STATE_ZERO);
        if (i == 0)
            c->is_data = data;
        else if (data != c->is_data)
            break;
        pos += entries[i];
        c->got = true;
    }
    c->end = pos;
    return 0;
}

static int nbd_extent_(struct vd_file *f, uint64_t off, bool *is_data, uint64_t *end)
{
    struct nbdf *n = f->priv;
    if (off >= n->size) {
        *is_data = false;
        *end = n->size;
        return 0;
    }
    uint64_t len = n->size - off;
    if (len > MAX_ZERO_REQ)
        len = MAX_ZERO_REQ;
    if (!n->meta) {
        *is_data = true;
        *end = n->size;
        return 0;
    }
    struct ext_ctx c = { .off = off };
    nbd_extent_callback cb = { .callback = extent_cb, .user_data = &c };
    int r = run_sync(f, S_STATUS, NULL, len, off, 0, cb);
    if (r < 0)
        return vd_err(r, "%s: block status at offset %llu failed: %s", f->name,
                      (unsigned long long)off, strerror(-r));
    if (!c.got || c.end <= off) {
        /* A server that answered nothing useful: assume data. */
        *is_data = true;
        *end = off + len;
        return 0;
    }
    *is_data = c.is_data;
    *end = c.end < n->size ? c.end : n->size;
    return 0;
}

static void nbd_close_(struct vd_file *f)
{
    struct nbdf *n = f->priv;
    if (!n)
        return;
    /* Every request has finished (the caller waited), so no loop still
     * watches the socket. */
    nbd_shutdown(n->h, 0);
    nbd_close(n->h);
    free(n->w);
    pthread_mutex_destroy(&n->lock);
    pthread_mutex_destroy(&n->io_lock);
    free(n);
    f->priv = NULL;
}

static const struct vd_proto nbd_proto = {
    .name = "nbd",
    .match = nbd_match,
    .open = nbd_open_,
    .close = nbd_close_,
    .pread = nbd_pread_,
    .pwrite = nbd_pwrite_,
    .sync = nbd_sync_,
    .size = nbd_size_,
    .truncate = nbd_truncate_,
    .punch = nbd_punch_,
    .zero = nbd_zero_,
    .extent = nbd_extent_,
    .submit = nbd_submit,
};

__attribute__((constructor)) static void nbd_register(void)
{
    vd_proto_register(&nbd_proto);
}
