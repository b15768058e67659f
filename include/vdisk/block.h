/* The disk: an opened image (its format layer and the backing chain below)
 * and the asynchronous request API every frontend uses (NBD, vhost-user,
 * the CLI). Requests complete through a callback on the submitting
 * thread's loop (loop.h); there are no coroutines. */
#ifndef VDISK_BLOCK_H
#define VDISK_BLOCK_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include "file.h"
#include "format.h"
#include "loop.h"

struct vd_disk;

struct vd_open_opts {
    const char *format;        /* NULL: probe */
    bool readonly;
    enum vd_cache cache;
    enum vd_aio aio;
    bool no_backing;           /* open the top layer only */
    bool discard_ignore;       /* discard=ignore (default unmap: free space) */
    bool nolock;               /* do not take the image lock (read-only tools) */
};

int  vd_disk_open(const char *filename, const struct vd_open_opts *o, struct vd_disk **out);
/* Flushes (when writable) and closes every layer. */
int  vd_disk_close(struct vd_disk *d);
/* Write the format's metadata out and sync the image's files now, whatever
 * the cache mode (cache=unsafe skips every other sync): end-of-job
 * durability for a job that ran with cache=unsafe. */
int  vd_disk_sync_now(struct vd_disk *d);
/* vd_disk_close with every sync it does made real under cache=unsafe. */
int  vd_disk_close_durable(struct vd_disk *d);
uint64_t vd_disk_size(const struct vd_disk *d);
struct vd_layer *vd_disk_top(struct vd_disk *d);
/* Number of layers in the chain (1 = no backing). */
int  vd_disk_depth(const struct vd_disk *d);

enum vd_op { VD_OP_READ, VD_OP_WRITE, VD_OP_FLUSH, VD_OP_DISCARD, VD_OP_WRITE_ZEROES };

/* request flags (VD_REQ_FUA, VD_REQ_MAY_UNMAP, VD_REQ_FAST_ZERO) are in format.h */

struct vd_req {
    enum vd_op op;
    unsigned flags;
    uint64_t off, len;
    struct iovec *iov;         /* READ / WRITE: buffers of total length len */
    int iovcnt;
    /* res: 0 or -errno. May run before vd_disk_submit returns. */
    void (*done)(struct vd_req *r, int res);
    void *opaque;
    /* core-private */
    struct vd_disk *disk;
    struct vd_loop *loop;
    int pending;
    int err;
};

/* Submit on the calling thread's loop (vd_loop_current()). Bad ranges or
 * writes to a read-only disk complete with -EINVAL / -EPERM / -EROFS. */
void vd_disk_submit(struct vd_disk *d, struct vd_req *r);

/* Synchronous conveniences (run the calling thread's loop until done). */
int vd_disk_pread(struct vd_disk *d, void *buf, size_t len, uint64_t off);
int vd_disk_pwrite(struct vd_disk *d, const void *buf, size_t len, uint64_t off, unsigned flags);
int vd_disk_flush(struct vd_disk *d);
int vd_disk_discard(struct vd_disk *d, uint64_t off, uint64_t len);
int vd_disk_write_zeroes(struct vd_disk *d, uint64_t off, uint64_t len, unsigned flags);

/* Block status of the range starting at off (metadata only, synchronous). */
#define VD_EXT_DATA       0x1   /* holds data (qemu's "data") */
#define VD_EXT_ZERO       0x2   /* reads as zeros (qemu's "zero") */
#define VD_EXT_ALLOCATED  0x4   /* allocated at some layer of the chain ("present") */
#define VD_EXT_COMPRESSED 0x8
#define VD_EXT_OFFSET     0x10  /* host_off valid (qemu's "offset") */

struct vd_extent {
    uint64_t off, len;
    unsigned flags;
    int depth;                 /* layer that answered: 0 = top */
    struct vd_file *file;      /* with VD_EXT_OFFSET */
    uint64_t host_off;
};
/* Describe the longest run starting at off (<= len) with the same answer.
 * Synchronous on the calling thread, whatever the disk (the CLI's call). */
int vd_disk_block_status(struct vd_disk *d, uint64_t off, uint64_t len, struct vd_extent *e);
/* The same for a server's loop: up to max extents of [off, off+len), one
 * after the other from off, into e[0..]; then cb(opaque, n) with the
 * number filled (>= 1) or -errno (message through vd_err), on the calling
 * thread's loop. When every layer is a local file it all happens before
 * this returns, as vd_disk_block_status does; when a layer is remote
 * (rbd:, nbd://) the look-ups, which may read tables from the network,
 * run on the worker pool (ordered by the disk's gate with its discard,
 * write-zeroes and flush) and cb runs later. */
typedef void (*vd_disk_cb)(void *opaque, int res);
void vd_disk_block_status_async(struct vd_disk *d, uint64_t off, uint64_t len, struct vd_extent *e,
                                unsigned max, vd_disk_cb cb, void *opaque);

/* Create an image. fmt: a format name; when o->size is 0 and a backing file
 * is given, the size is the backing file's. */
int vd_image_create(const char *filename, const char *fmt, struct vd_create_opts *o);
/* Parse provisioning=thin|lazy-zeroed|eager-zeroed or
 * preallocation=off|metadata|falloc|full from opts into *out. */
int vd_prealloc_from_opts(struct vd_opts *opts, enum vd_prealloc *out);

/* Resize (grow, or shrink when the format allows), then flush. On a disk
 * with a remote layer it waits for the disk's requests in flight and runs
 * alone (the gate); vd_disk_resize runs the calling thread's loop until
 * it is done. */
int vd_disk_resize(struct vd_disk *d, uint64_t size, enum vd_prealloc prealloc);
/* The same for a loop: cb(opaque, 0 or -errno) on the calling thread's
 * loop; before this returns when every layer is local, else after the
 * format's and backend's calls ran on the worker pool. */
void vd_disk_resize_async(struct vd_disk *d, uint64_t size, enum vd_prealloc prealloc,
                          vd_disk_cb cb, void *opaque);

#endif
