/* A vhost-user-blk front-end as a library: connects to a back-end socket
 * (vdiskd, qemu-storage-daemon), shares memfd-backed memory, negotiates,
 * sets up split virtqueues and moves virtio-blk requests without a VM, in
 * the way libblkio's virtio-blk-vhost-user driver does. I/O buffers must
 * lie in the shared buffer area (vd_vhu_buf). One thread per queue may
 * submit and reap on that queue; connection calls are not thread-safe. */
#ifndef VMM_GLUE_VHOST_FRONT_H
#define VMM_GLUE_VHOST_FRONT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vd_vhu;

struct vd_vhu_opts {
    unsigned num_queues;     /* 0: 1 */
    unsigned queue_size;     /* power of two, 0: 128 */
    size_t buf_size;         /* shared buffer area in bytes (0: 64 MiB) */
    bool no_indirect;        /* three ring descriptors per request */
    bool no_event_idx;
    bool no_inflight;        /* do not ask for inflight tracking */
    bool split_memory;       /* buffers in a second memory region */
};

enum vd_vhu_op { VD_VHU_READ, VD_VHU_WRITE, VD_VHU_FLUSH, VD_VHU_DISCARD,
                 VD_VHU_WRITE_ZEROES, VD_VHU_GET_ID };

struct vd_vhu_io {
    enum vd_vhu_op op;
    uint64_t off;            /* bytes, multiple of 512 */
    uint32_t len;            /* bytes (GET_ID: 20) */
    void *buf;               /* inside vd_vhu_buf()'s area */
    bool unmap;              /* write-zeroes: may deallocate */
    void *cookie;
};

struct vd_vhu_done {
    void *cookie;
    int status;              /* VIRTIO_BLK_S_*: 0 OK, 1 IOERR, 2 UNSUPP */
    uint32_t used_len;
};

int  vd_vhu_connect(const char *path, const struct vd_vhu_opts *o, struct vd_vhu **out);
void vd_vhu_close(struct vd_vhu *f);
uint64_t vd_vhu_capacity(const struct vd_vhu *f);      /* bytes */
unsigned vd_vhu_num_queues(const struct vd_vhu *f);
uint64_t vd_vhu_features(const struct vd_vhu *f);     /* negotiated virtio features */
uint64_t vd_vhu_protocol_features(const struct vd_vhu *f);
void    *vd_vhu_buf(const struct vd_vhu *f, size_t *size);
/* Read the device config space again (e.g. after a resize). */
int  vd_vhu_refresh_config(struct vd_vhu *f);
/* The back-end's channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ), -1 when not
 * negotiated: poll it for input, then call vd_vhu_backend_msg, which
 * handles one message and returns 1 for a config change (the capacity is
 * re-read), 0 for another message, -errno on error. */
int  vd_vhu_backend_fd(const struct vd_vhu *f);
int  vd_vhu_backend_msg(struct vd_vhu *f);

/* Queue one request; -EAGAIN when the queue is full. Nothing reaches the
 * back-end before vd_vhu_kick. */
int  vd_vhu_submit(struct vd_vhu *f, unsigned q, const struct vd_vhu_io *io);
void vd_vhu_kick(struct vd_vhu *f, unsigned q);
/* Completed requests (non-blocking); returns how many were stored. */
int  vd_vhu_reap(struct vd_vhu *f, unsigned q, struct vd_vhu_done *out, int max);
/* Requests submitted and not yet reaped on queue q. */
unsigned vd_vhu_pending(const struct vd_vhu *f, unsigned q);
/* Wait until queue q has completions, up to timeout_ms: 1 ready, 0 timed
 * out, -EPIPE when the back-end went away (call vd_vhu_reconnect). */
int  vd_vhu_wait(struct vd_vhu *f, unsigned q, int timeout_ms);
int  vd_vhu_call_fd(const struct vd_vhu *f, unsigned q);
int  vd_vhu_sock_fd(const struct vd_vhu *f);
/* Arm interrupts for q (before sleeping on its call fd): true when
 * completions are already there. */
bool vd_vhu_arm(struct vd_vhu *f, unsigned q);
/* Dirty logging, the part of live migration a VMM plays: share a bitmap
 * covering the memory (one bit per 4 KiB page of guest-physical address,
 * bit n in byte n / 8) and turn VHOST_F_LOG_ALL and every ring's
 * VHOST_VRING_F_LOG on or off. -ENOTSUP when the back-end lacks
 * VHOST_F_LOG_ALL or the LOG_SHMFD protocol feature. Kept across
 * reconnects. */
int  vd_vhu_log_enable(struct vd_vhu *f, bool on);
/* The bitmap (NULL before the first vd_vhu_log_enable) and its size. */
uint8_t *vd_vhu_log_bits(const struct vd_vhu *f, size_t *size);
/* Guest-physical address of p, which must lie in the shared memory
 * (UINT64_MAX otherwise). */
uint64_t vd_vhu_gpa(const struct vd_vhu *f, const void *p);
/* Where queue q's parts lie in guest-physical memory: its used ring (which
 * the back-end writes) and the per-request area holding the status bytes
 * (which it writes too), for checking a dirty log. */
struct vd_vhu_qlayout { uint64_t used, used_len, slots, slots_len; };
void vd_vhu_queue_layout(const struct vd_vhu *f, unsigned q, struct vd_vhu_qlayout *l);
/* Connect again (retrying up to timeout_ms) and restore the queues, keeping
 * the requests in flight: with inflight tracking the back-end resubmits
 * them. */
int  vd_vhu_reconnect(struct vd_vhu *f, int timeout_ms);

#endif
