/* Host storage under a format: a local file (or block device), or a
 * protocol backend (NBD, RBD) behind the same calls. Synchronous calls are
 * for metadata and slow paths; data I/O goes through vd_io (engine.h). */
#ifndef VDISK_FILE_H
#define VDISK_FILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <sys/uio.h>

struct vd_io;

/* qemu's cache= names.
 *   writeback     page cache; flushes (and FUA) sync the files
 *   none          O_DIRECT; flushes sync
 *   unsafe        page cache; every sync is skipped (flushes, FUA, the
 *                 formats' metadata-ordering syncs, durable writes) except
 *                 vd_disk_sync_now / vd_disk_close_durable / vd_file_sync_now:
 *                 for data that may be lost on a host crash
 *   writethrough  page cache; every write is followed by a flush (as FUA)
 *   directsync    O_DIRECT; every write is followed by a flush */
enum vd_cache {
    VD_CACHE_WRITEBACK = 0, VD_CACHE_NONE = 1, VD_CACHE_UNSAFE = 2,
    VD_CACHE_WRITETHROUGH = 3, VD_CACHE_DIRECTSYNC = 4,
};
/* true for the modes that open files with O_DIRECT */
static inline bool vd_cache_direct(enum vd_cache c)
{
    return c == VD_CACHE_NONE || c == VD_CACHE_DIRECTSYNC;
}
enum vd_aio { VD_AIO_DEFAULT = 0, VD_AIO_IO_URING, VD_AIO_NATIVE, VD_AIO_THREADS };

/* vd_file_open flags */
#define VD_FILE_RDONLY   0x1
#define VD_FILE_CREATE   0x2   /* create; fail if it exists */
#define VD_FILE_TRUNC    0x4   /* with CREATE: create or truncate an existing file */
#define VD_FILE_NOLOCK   0x8   /* do not take the OFD lock */

struct vd_file;

/* A protocol backend (the posix file backend, nbd://, rbd:). Any op may be
 * NULL where the backend cannot do it (the core returns -ENOTSUP). */
struct vd_proto {
    const char *name;
    /* true when this backend handles the given file name (e.g. "nbd://") */
    bool (*match)(const char *name);
    int (*open)(struct vd_file *f, const char *name, int flags, enum vd_cache cache);
    void (*close)(struct vd_file *f);
    int (*pread)(struct vd_file *f, void *buf, size_t len, uint64_t off);
    int (*pwrite)(struct vd_file *f, const void *buf, size_t len, uint64_t off);
    int (*sync)(struct vd_file *f);
    int (*size)(struct vd_file *f, uint64_t *size);
    int (*truncate)(struct vd_file *f, uint64_t size);
    int (*allocate)(struct vd_file *f, uint64_t off, uint64_t len);   /* reserve, reads zero */
    int (*punch)(struct vd_file *f, uint64_t off, uint64_t len);      /* deallocate, reads zero */
    int (*zero)(struct vd_file *f, uint64_t off, uint64_t len);       /* reads zero, stays allocated */
    /* Find the extent starting at off: *is_data, and its end (*end <= eof). */
    int (*extent)(struct vd_file *f, uint64_t off, bool *is_data, uint64_t *end);
    uint64_t (*allocated_bytes)(struct vd_file *f);
    /* Asynchronous I/O of the backend's own (libnbd, librbd). NULL: the
     * core submits preadv/pwritev/fdatasync on f->fd to the loop's engine. */
    void (*submit)(struct vd_file *f, struct vd_io *io);
    /* submit also takes VD_IO_PUNCH and VD_IO_ZERO, so that raw images on
     * this backend discard and zero without blocking the loop (a cluster
     * round trip would stall every export on it). */
    bool submit_zero;
};

struct vd_file {
    const struct vd_proto *proto;
    int fd;                 /* -1 for backends without one */
    char *name;             /* as given by the user */
    bool readonly;
    bool direct;            /* O_DIRECT (cache=none) */
    bool unsafe;            /* cache=unsafe: syncs are skipped (see enum vd_cache) */
    uint32_t align;         /* alignment direct I/O needs (memory, offset, length); 1 if buffered */
    pthread_mutex_t rmw_lock;  /* serialises unaligned read-modify-write on direct files */
    void *priv;             /* backend state */
};

int  vd_file_open(const char *name, int flags, enum vd_cache cache, struct vd_file **out);
/* true when name is a path of the local file system (no backend such as
 * nbd:// or rbd: claims it) */
bool vd_file_name_is_local(const char *name);
void vd_file_close(struct vd_file *f);
/* Full transfers or an error. Reads past the end of the file return zeros. */
int  vd_file_pread(struct vd_file *f, void *buf, size_t len, uint64_t off);
int  vd_file_pwrite(struct vd_file *f, const void *buf, size_t len, uint64_t off);
/* Make what was written durable; a no-op on cache=unsafe files (except
 * inside vd_disk_sync_now). vd_file_sync_now syncs whatever the mode. */
int  vd_file_sync(struct vd_file *f);
int  vd_file_sync_now(struct vd_file *f);
/* Write and make just this range durable (RWF_DSYNC on local files, else a
 * write then a sync): for metadata that must reach the disk before what
 * follows. A plain write on cache=unsafe files. */
int  vd_file_pwrite_durable(struct vd_file *f, const void *buf, size_t len, uint64_t off);
/* Start writing back what is dirty in [off, off+len) (len 0: to the end of
 * the file) without waiting for it: a hint that shortens a later sync, no
 * guarantee of anything (sync_file_range(SYNC_FILE_RANGE_WRITE) on local
 * buffered files; nothing elsewhere). Not a sync: done in every mode. */
int  vd_file_start_writeback(struct vd_file *f, uint64_t off, uint64_t len);
/* true when a sync of f would be skipped now (cache=unsafe, outside
 * vd_disk_sync_now); the engines use it for VD_IO_SYNC. */
bool vd_file_sync_skipped(const struct vd_file *f);
int  vd_file_size(struct vd_file *f, uint64_t *size);
int  vd_file_truncate(struct vd_file *f, uint64_t size);
int  vd_file_allocate(struct vd_file *f, uint64_t off, uint64_t len);
int  vd_file_punch(struct vd_file *f, uint64_t off, uint64_t len);
int  vd_file_zero(struct vd_file *f, uint64_t off, uint64_t len);
/* Write zeros over [off, off+len), 1 MiB at a time (preallocation=full, and
 * files that can neither punch nor zero). */
int  vd_file_write_zeros(struct vd_file *f, uint64_t off, uint64_t len);
/* Zeros in [off, off+len): a hole when unmap allows it, else zeroed by the
 * file system, else written; with fast, -ENOTSUP rather than writing. */
int  vd_file_zero_range(struct vd_file *f, uint64_t off, uint64_t len, bool unmap, bool fast);
int  vd_file_extent(struct vd_file *f, uint64_t off, bool *is_data, uint64_t *end);
uint64_t vd_file_allocated_bytes(struct vd_file *f);
/* Register a protocol backend (done once at start-up by each backend's
 * constructor); the posix backend is the fallback for names no backend matches. */
void vd_proto_register(const struct vd_proto *p);

/* Aligned allocation usable for direct I/O on any file (4 KiB aligned). */
void *vd_alloc_aligned(size_t len);

/* Whether the len bytes at p are all zero (true for len 0). */
bool vd_buf_is_zero(const void *p, size_t len);

#endif
