/* vhost-user-blk back-end: serves a vd_disk to one vhost-user front-end
 * (QEMU, or this library's front-end) on a unix socket. The control
 * messages run on a thread of the export's own; each virtqueue runs on one
 * of the export's loop threads and submits straight into guest memory. */
#ifndef VMM_GLUE_VHOST_BLK_H
#define VMM_GLUE_VHOST_BLK_H

#include <stdbool.h>
#include <stdint.h>
#include "vdisk/block.h"

struct vd_vhost_blk;

struct vd_vhost_blk_opts {
    unsigned num_queues;    /* queues offered (1..64; 0: 1) */
    unsigned nthreads;      /* loop threads for the queues (0: min(num_queues, CPUs)) */
    enum vd_aio aio;        /* I/O engine of those loops */
    bool readonly;          /* offer VIRTIO_BLK_F_RO and refuse writes */
    const char *serial;     /* VIRTIO_BLK_T_GET_ID answer (up to 20 bytes); NULL: none */
    uint32_t logical_block_size;   /* 512 (default) or 4096 */
    /* Requests taken from the avail ring between two submissions to the
     * kernel (0: VHB_SUBMIT_BATCH; UINT32_MAX: one submission per loop
     * iteration). See vhost_blk_queue.c, process(). */
    uint32_t submit_batch;
    /* Called on the queue's thread for each disk request that finished
     * (op, bytes, latency in ns, 0 or -errno); NULL: none. */
    void (*stat)(void *opaque, enum vd_op op, uint64_t bytes, uint64_t ns, int res);
    void *stat_opaque;
};

struct vd_vhost_blk_stats {
    uint64_t requests, reads, writes, flushes, discards, write_zeroes, errors;
    uint64_t bytes_read, bytes_written;
    uint64_t connections;
    bool connected;
    unsigned num_queues;
    uint64_t queue_requests[64];   /* per virtqueue */
};

/* Listen on socket_path (replacing a stale socket file) and serve d, which
 * must stay open until vd_vhost_blk_free. */
int  vd_vhost_blk_new(struct vd_disk *d, const char *socket_path,
                      const struct vd_vhost_blk_opts *o, struct vd_vhost_blk **out);
/* Drop the front-end (completing what is in flight), stop the threads and
 * remove the socket. The disk is left open. */
void vd_vhost_blk_free(struct vd_vhost_blk *b);
/* The disk changed size: tell the front-end (config change on the back-end
 * channel, when negotiated). */
int  vd_vhost_blk_resized(struct vd_vhost_blk *b);
void vd_vhost_blk_get_stats(struct vd_vhost_blk *b, struct vd_vhost_blk_stats *st);
const char *vd_vhost_blk_socket(const struct vd_vhost_blk *b);

#endif
