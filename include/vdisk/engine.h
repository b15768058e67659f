/* Asynchronous host I/O. A vd_io is submitted to a loop (loop.h), which
 * hands it to the backend's own submit or to the loop's engine: io_uring,
 * libaio or a thread pool. Completion runs io->done on that loop's thread. */
#ifndef VDISK_ENGINE_H
#define VDISK_ENGINE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include "file.h"

/* VD_IO_PUNCH (deallocate, reads as zeros) and VD_IO_ZERO (reads as zeros,
 * stays allocated) go only to backends whose proto sets submit_zero; they
 * carry len and no buffers. */
enum vd_io_op { VD_IO_READ, VD_IO_WRITE, VD_IO_SYNC, VD_IO_PUNCH, VD_IO_ZERO };

struct vd_io {
    enum vd_io_op op;
    struct vd_file *file;
    uint64_t off;
    struct iovec *iov;
    int iovcnt;
    uint64_t len;           /* VD_IO_PUNCH, VD_IO_ZERO: bytes from off */
    /* res: 0 when the whole transfer was done (short transfers are resumed
     * by the engine; reads past EOF are zero-filled), else -errno. */
    void (*done)(struct vd_io *io, int res);
    void *opaque;
    /* engine-private */
    struct vd_loop *loop;
    uint64_t xfer;          /* bytes done so far */
    struct iovec *cur_iov;  /* resume point for short transfers */
    int cur_iovcnt;
    struct iovec cur_first;
    struct vd_io *next;
};

struct vd_engine;
struct vd_engine_ops {
    const char *name;
    int  (*init)(struct vd_engine **out, unsigned depth);
    void (*fini)(struct vd_engine *e);
    /* fd that becomes readable when completions are ready */
    int  (*event_fd)(struct vd_engine *e);
    void (*submit)(struct vd_engine *e, struct vd_io *io);
    /* push out queued submissions (called once per loop iteration) */
    void (*flush)(struct vd_engine *e);
    /* reap completions; calls io->done for each; returns how many */
    int  (*reap)(struct vd_engine *e);
    /* optional: true while requests are submitted and not yet reaped */
    bool (*busy)(struct vd_engine *e);
};

extern const struct vd_engine_ops vd_engine_io_uring, vd_engine_aio, vd_engine_threads;

/* The engine for aio=…: the requested one, or the next that works here
 * (io_uring → native → threads) when VD_AIO_DEFAULT. */
const struct vd_engine_ops *vd_engine_pick(enum vd_aio aio);
int vd_aio_parse(const char *s, enum vd_aio *out);     /* "io_uring" | "native" | "threads" */
/* "none" | "writeback" | "unsafe" | "writethrough" | "directsync" (file.h) */
int vd_cache_parse(const char *s, enum vd_cache *out);
const char *vd_cache_name(enum vd_cache c);

#endif
