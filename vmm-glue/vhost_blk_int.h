/* Internal to the vhost-user-blk back-end: the export, its queues and the
 * control <-> queue-thread hand-offs. */
#ifndef VMM_GLUE_VHOST_BLK_INT_H
#define VMM_GLUE_VHOST_BLK_INT_H

#include <pthread.h>
#include <semaphore.h>
#include "vdisk/block.h"
#include "vdisk/loop.h"
#include "vmm-glue/vhost_blk.h"
#include "vmm-glue/vhost_log.h"
#include "vmm-glue/vhost_mem.h"
#include "vmm-glue/vhost_proto.h"
#include "vmm-glue/virtio_blk.h"
#include "vmm-glue/virtq.h"

#define VHB_MAX_QUEUES 64
#define VHB_SEG_MAX    254                  /* data segments a request may have */
#define VHB_IOV_CAP    (VHB_SEG_MAX + 18)   /* + header, status, region splits */
#define VHB_SUBMIT_BATCH 4                  /* default vd_vhost_blk_opts.submit_batch */

struct vhb_queue;

struct vhb_req {
    struct vd_req vr;
    struct vhb_queue *q;
    struct vhu_mtab *mt;       /* keeps the guest memory mapped until done */
    uint8_t *status;
    uint32_t used_len;
    uint64_t t0;               /* submission time (ns), with a stat callback */
    uint16_t head;
    uint16_t nout, niov;       /* iov[nout, niov): the device-writable buffers */
    bool busy;
    struct iovec iov[VHB_IOV_CAP];
};

/* What the control thread hands a queue thread to start a ring. */
struct vhb_start {
    struct vhu_mtab *mt;       /* a reference, passed on */
    void *desc, *avail, *used;
    uint16_t base;
    bool event_idx;
    struct vhu_inflight_queue *inflight;
    struct vhu_log *log;       /* dirty log (NULL: off), used ring too when log_used */
    bool log_used;
    uint64_t log_used_gpa;
    /* out: with EVENT_IDX, the driver was owed a signal for chains already
     * in the used ring (a previous back-end returned them and stopped
     * before signalling) and was sent one */
    bool owed_signal;
};

struct vhb_thread {
    pthread_t tid;
    struct vd_loop *loop;
    enum vd_aio aio;
    int rc;
    sem_t ready;
};

struct vhb_queue {
    struct vd_vhost_blk *b;
    unsigned index;
    struct vd_loop *loop;          /* the thread this queue runs on */
    /* set by the control thread while the ring is stopped */
    unsigned num;
    struct vhu_vring_addr addr;
    bool have_addr;
    uint16_t base;
    int kick_fd, call_fd, err_fd;
    bool enabled;
    bool running;                  /* control's view: started and not yet stopped */
    /* owned by the queue thread while running */
    struct virtq vq;
    struct vhu_mtab *mt;
    struct vhb_req *reqs;          /* one per descriptor head */
    unsigned inflight;
    bool q_enabled, stopping, in_process, notify_pending, broken_reported;
    uint64_t notify_timer;         /* a deferred signal (vd_loop timer id), 0: none */
    sem_t *drained;
    /* statistics (relaxed atomics: read by other threads) */
    uint64_t st_requests, st_reads, st_writes, st_flushes, st_discards, st_wz, st_errors;
    uint64_t st_bytes_read, st_bytes_written;
};

struct vd_vhost_blk {
    struct vd_disk *disk;
    struct vd_vhost_blk_opts o;
    char serial[VIRTIO_BLK_ID_BYTES];
    char *path;
    int listen_fd, conn_fd, stop_fd;
    pthread_t ctl;
    pthread_mutex_t lock;          /* backend channel, config, stats */
    int backend_fd;
    uint64_t features, pfeatures;
    bool features_acked;
    uint8_t wce;                   /* config writeback: 1 write-back, 0 write-through */
    struct vhu_mtab *mt;
    struct vhu_log *log;           /* from SET_LOG_BASE; used while LOG_ALL is on */
    void *inflight_map;
    size_t inflight_size;
    unsigned inflight_qsize;
    unsigned nthreads;
    struct vhb_thread *thr;
    struct vhb_queue q[VHB_MAX_QUEUES];
    uint64_t connections;
    bool connected;
};

/* queue thread side (vhost_blk_queue.c); all are called from the control
 * thread and wait until the queue thread has done the work. */
int  vhb_queue_start(struct vhb_queue *q, struct vhb_start *s);
/* Stop taking requests, wait for those in flight, return the next
 * available index. */
uint16_t vhb_queue_stop(struct vhb_queue *q);
void vhb_queue_set_call(struct vhb_queue *q, int fd);
void vhb_queue_set_err(struct vhb_queue *q, int fd);
void vhb_queue_set_enabled(struct vhb_queue *q, bool on);
/* Dirty logging on a running queue: log NULL turns it off. The previous
 * log is no longer used when this returns. */
void vhb_queue_set_log(struct vhb_queue *q, struct vhu_log *log, bool used, uint64_t used_gpa);
/* Switch a running queue to a new memory table (ring pointers
 * re-translated by the caller; NULL ring pointers break the queue). */
void vhb_queue_set_mem(struct vhb_queue *q, struct vhb_start *s);

/* the config space as the device presents it now */
void vhb_config(struct vd_vhost_blk *b, struct virtio_blk_config *c);

#endif
