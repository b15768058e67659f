/* The device side of a split virtqueue (VIRTIO 1.2, 2.7): popping
 * available descriptor chains into host iovecs, returning used buffers,
 * notification suppression (EVENT_IDX) and vhost-user inflight tracking.
 * Everything read from guest memory is validated here: a chain that loops,
 * is longer than the queue, nests indirect tables, mixes directions or
 * points outside guest memory is reported, never followed. */
#ifndef VMM_GLUE_VIRTQ_H
#define VMM_GLUE_VIRTQ_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include "vmm-glue/vhost_log.h"
#include "vmm-glue/vhost_mem.h"

#define VIRTQ_DESC_F_NEXT     1
#define VIRTQ_DESC_F_WRITE    2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY     1
#define VIRTQ_MAX_SIZE 32768

struct virtq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct virtq_avail { uint16_t flags, idx, ring[]; /* then used_event */ };
struct virtq_used_elem { uint32_t id, len; };
struct virtq_used { uint16_t flags, idx; struct virtq_used_elem ring[]; /* then avail_event */ };

static inline uint64_t virtq_desc_bytes(unsigned num)  { return 16ull * num; }
static inline uint64_t virtq_avail_bytes(unsigned num) { return 6ull + 2ull * num; }
static inline uint64_t virtq_used_bytes(unsigned num)  { return 6ull + 8ull * num; }

struct virtq {
    unsigned num;
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    const struct vhu_mtab *mt;      /* translates descriptor addresses */
    bool event_idx;
    bool broken;                    /* the driver broke the ring protocol */
    uint16_t last_avail;            /* next available entry to pop */
    uint16_t used_idx;              /* our copy of used->idx */
    uint16_t signalled_used;
    bool signalled_used_valid;
    struct vhu_inflight_queue *inflight;   /* NULL: no tracking */
    uint64_t inflight_counter;
    /* dirty logging (set after virtq_init): log is non-NULL while the
     * front-end has VHOST_F_LOG_ALL on; used-ring writes are logged too
     * when log_used (VHOST_VRING_F_LOG), at log_used_gpa + their offset */
    struct vhu_log *log;
    bool log_used;
    uint64_t log_used_gpa;
};

/* A mapped chain: device-readable segments [0, nout), then device-writable
 * [nout, niov). */
struct virtq_chain {
    struct iovec *iov;
    unsigned cap, niov, nout;
    uint64_t out_len, in_len;
    /* for a chain that is whole but names a bad buffer (outside guest
     * memory, wrong direction, too many segments): its last byte when the
     * last descriptor is device-writable, else NULL */
    uint8_t *status;
};

/* Set up q over ring memory already translated (and bounds-checked for num
 * entries) by the caller; checks sizes and alignment. */
int  virtq_init(struct virtq *q, unsigned num, void *desc, void *avail, void *used,
                const struct vhu_mtab *mt, bool event_idx, uint16_t last_avail);
/* 1 and *head when a chain was available, 0 when none, -EIO when the ring
 * is broken (q->broken is set and the queue must not be used further). */
int  virtq_pop(struct virtq *q, uint16_t *head);
/* Map the chain at head into c. -EIO when the chain is malformed: c then
 * holds the segments mapped before the fault (directions still ordered),
 * and c->status where the driver's status byte could still be found. */
int  virtq_map_chain(const struct virtq *q, uint16_t head, struct virtq_chain *c);
/* Return head to the driver with len bytes written (logged, with the used
 * index, when the used ring is logged). */
void virtq_push(struct virtq *q, uint16_t head, uint32_t len);
/* After pushes: whether the driver wants an interrupt now. */
bool virtq_should_notify(struct virtq *q);
/* When a ring starts: whether the driver may be waiting for a signal for
 * chains already in the used ring (returned by a back-end that stopped, or
 * died, before it signalled them). Changes no notification state. */
bool virtq_restart_should_notify(struct virtq *q);
/* Ask for kicks for entries past last_avail; true when more are already
 * available (the caller should keep popping). */
bool virtq_arm(struct virtq *q);

/* Inflight tracking: attach a queue region; on the first use it is
 * initialised, otherwise (a reconnect) the heads the previous process had
 * in flight are returned in heads (ordered by submission), last_avail is
 * recomputed and the count is returned (or -EIO). */
int  virtq_inflight_attach(struct virtq *q, struct vhu_inflight_queue *r, uint64_t features,
                           uint16_t *heads, unsigned max);
/* Mark head as taken by the device (called by virtq_pop). */
void virtq_inflight_mark(struct virtq *q, uint16_t head);

/* Helpers over iovec arrays. */
uint64_t virtq_iov_copy_from(const struct iovec *iov, unsigned n, uint64_t off, void *buf, uint64_t len);
uint64_t virtq_iov_copy_to(const struct iovec *iov, unsigned n, uint64_t off, const void *buf, uint64_t len);
/* Point dst (capacity cap) at [off, off+len) of iov; returns the count or -1. */
int virtq_iov_slice(const struct iovec *iov, unsigned n, uint64_t off, uint64_t len,
                    struct iovec *dst, unsigned cap);

#endif
