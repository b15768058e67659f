/* Engine selection, option names, and the progress bookkeeping every
 * engine shares (short transfers, reads past the end of the file). */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vdisk/engine.h"
#include "vdisk/error.h"
#include "block/engine_int.h"

void vd_io_begin(struct vd_io *io)
{
    io->xfer = 0;
    io->cur_iov = io->iov;
    io->cur_iovcnt = io->op == VD_IO_SYNC ? 0 : io->iovcnt;
    io->next = NULL;
}

/* Zero the buffers from byte io->xfer of the request to its end. */
static void zero_rest(struct vd_io *io)
{
    uint64_t skip = io->xfer;
    for (int i = 0; i < io->iovcnt; i++) {
        size_t len = io->iov[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        memset((char *)io->iov[i].iov_base + skip, 0, len - skip);
        skip = 0;
    }
}

bool vd_io_advance(struct vd_io *io, ssize_t n, int *res)
{
    if (n < 0) {
        *res = (int)n;
        return true;
    }
    if (io->op == VD_IO_SYNC) {
        *res = 0;
        return true;
    }
    /* Locate the first byte not yet transferred. Resumes are rare, so a
     * walk from the start keeps the state down to one counter. */
    io->xfer += (uint64_t)n;
    uint64_t skip = io->xfer;
    int k = 0;
    while (k < io->iovcnt && skip >= io->iov[k].iov_len) {
        skip -= io->iov[k].iov_len;
        k++;
    }
    if (k == io->iovcnt) {
        *res = 0;
        return true;
    }
    if (n == 0) {
        if (io->op == VD_IO_READ) {     /* end of file: the rest reads as zeros */
            zero_rest(io);
            *res = 0;
        } else {
            *res = -EIO;                /* a write that makes no progress */
        }
        return true;
    }
    /* A direct-I/O read that stops short at an unaligned place has met the
     * end of the file (the kernel would refuse an unaligned resume). */
    if (io->op == VD_IO_READ && io->file && io->file->direct && io->file->align > 1 &&
        (io->off + io->xfer) % io->file->align != 0) {
        zero_rest(io);
        *res = 0;
        return true;
    }
    if (skip == 0) {
        io->cur_iov = &io->iov[k];
        io->cur_iovcnt = io->iovcnt - k;
    } else {
        io->cur_first.iov_base = (char *)io->iov[k].iov_base + skip;
        io->cur_first.iov_len = io->iov[k].iov_len - skip;
        io->cur_iov = &io->cur_first;
        io->cur_iovcnt = 1;
    }
    return false;
}

int vd_io_run_sync(struct vd_io *io)
{
    int fd = io->file ? io->file->fd : -1;
    int res;
    vd_io_begin(io);
    for (;;) {
        ssize_t n;
        switch (io->op) {
        case VD_IO_READ:
            n = preadv(fd, io->cur_iov, io->cur_iovcnt, (off_t)(io->off + io->xfer));
            break;
        case VD_IO_WRITE:
            n = pwritev(fd, io->cur_iov, io->cur_iovcnt, (off_t)(io->off + io->xfer));
            break;
        case VD_IO_SYNC:
            n = fdatasync(fd);
            break;
        default:
            return -EINVAL;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            n = -errno;
        }
        if (vd_io_advance(io, n, &res))
            return res;
    }
}

/* ---- selection ---- */

static const struct vd_engine_ops *const order[] = {
    &vd_engine_io_uring, &vd_engine_aio, &vd_engine_threads,
};

static const struct vd_engine_ops *default_engine;
static pthread_once_t default_once = PTHREAD_ONCE_INIT;

static bool works(const struct vd_engine_ops *ops)
{
    struct vd_engine *e;
    if (ops->init(&e, 4) < 0)
        return false;
    ops->fini(e);
    return true;
}

static void pick_default(void)
{
    /* VDISK_AIO=threads|native|io_uring overrides the choice (tests use it
     * to run a whole stack on each engine). */
    const char *env = getenv("VDISK_AIO");
    enum vd_aio want;
    size_t start = 0;
    if (env && *env && vd_aio_parse(env, &want) == 0 && want != VD_AIO_DEFAULT)
        start = (size_t)want - 1;
    for (size_t i = start; i < sizeof(order) / sizeof(order[0]); i++) {
        if (works(order[i])) {
            default_engine = order[i];
            return;
        }
    }
    default_engine = &vd_engine_threads;
}

const struct vd_engine_ops *vd_engine_pick(enum vd_aio aio)
{
    switch (aio) {
    case VD_AIO_IO_URING: return &vd_engine_io_uring;
    case VD_AIO_NATIVE:   return &vd_engine_aio;
    case VD_AIO_THREADS:  return &vd_engine_threads;
    case VD_AIO_DEFAULT:
    default:
        pthread_once(&default_once, pick_default);
        return default_engine;
    }
}

int vd_aio_parse(const char *s, enum vd_aio *out)
{
    static const struct { const char *name; enum vd_aio v; } names[] = {
        { "io_uring", VD_AIO_IO_URING }, { "native", VD_AIO_NATIVE },
        { "threads", VD_AIO_THREADS }, { "default", VD_AIO_DEFAULT },
    };
    for (size_t i = 0; s && i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].v;
            return 0;
        }
    }
    return vd_err(-EINVAL, "invalid aio mode '%s' (expected io_uring, native or threads)",
                  s ? s : "");
}

int vd_cache_parse(const char *s, enum vd_cache *out)
{
    /* qemu's cache modes; see enum vd_cache for what each does here. */
    static const struct { const char *name; enum vd_cache v; } names[] = {
        { "none", VD_CACHE_NONE }, { "directsync", VD_CACHE_DIRECTSYNC },
        { "writeback", VD_CACHE_WRITEBACK }, { "writethrough", VD_CACHE_WRITETHROUGH },
        { "unsafe", VD_CACHE_UNSAFE },
    };
    for (size_t i = 0; s && i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].v;
            return 0;
        }
    }
    return vd_err(-EINVAL, "invalid cache mode '%s' (expected none, writeback, "
                  "directsync, writethrough or unsafe)", s ? s : "");
}

const char *vd_cache_name(enum vd_cache c)
{
    switch (c) {
    case VD_CACHE_WRITEBACK:    return "writeback";
    case VD_CACHE_NONE:         return "none";
    case VD_CACHE_UNSAFE:       return "unsafe";
    case VD_CACHE_WRITETHROUGH: return "writethrough";
    case VD_CACHE_DIRECTSYNC:   return "directsync";
    }
    return "?";
}
