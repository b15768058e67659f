/* vhost-user wire format (QEMU docs/interop/vhost-user.rst) and the
 * virtio constants both sides of this library need. Native byte order on
 * the socket; virtio rings are little-endian (x86 only here). */
#ifndef VMM_GLUE_VHOST_PROTO_H
#define VMM_GLUE_VHOST_PROTO_H

#include <stdint.h>
#include <stddef.h>

/* front-end requests */
enum {
    VHU_GET_FEATURES = 1,
    VHU_SET_FEATURES = 2,
    VHU_SET_OWNER = 3,
    VHU_RESET_OWNER = 4,
    VHU_SET_MEM_TABLE = 5,
    VHU_SET_LOG_BASE = 6,
    VHU_SET_LOG_FD = 7,
    VHU_SET_VRING_NUM = 8,
    VHU_SET_VRING_ADDR = 9,
    VHU_SET_VRING_BASE = 10,
    VHU_GET_VRING_BASE = 11,
    VHU_SET_VRING_KICK = 12,
    VHU_SET_VRING_CALL = 13,
    VHU_SET_VRING_ERR = 14,
    VHU_GET_PROTOCOL_FEATURES = 15,
    VHU_SET_PROTOCOL_FEATURES = 16,
    VHU_GET_QUEUE_NUM = 17,
    VHU_SET_VRING_ENABLE = 18,
    VHU_SET_BACKEND_REQ_FD = 21,
    VHU_GET_CONFIG = 24,
    VHU_SET_CONFIG = 25,
    VHU_GET_INFLIGHT_FD = 31,
    VHU_SET_INFLIGHT_FD = 32,
    VHU_RESET_DEVICE = 34,
    VHU_GET_MAX_MEM_SLOTS = 36,
    VHU_ADD_MEM_REG = 37,
    VHU_REM_MEM_REG = 38,
};

/* back-end requests (on the backend channel) */
enum { VHU_BACKEND_CONFIG_CHANGE_MSG = 2 };

/* header flags */
#define VHU_VERSION        0x1u
#define VHU_VERSION_MASK   0x3u
#define VHU_FLAG_REPLY     0x4u
#define VHU_FLAG_NEED_REPLY 0x8u

/* protocol feature bits */
enum {
    VHU_PF_MQ = 0,
    VHU_PF_LOG_SHMFD = 1,
    VHU_PF_REPLY_ACK = 3,
    VHU_PF_BACKEND_REQ = 5,
    VHU_PF_CONFIG = 9,
    VHU_PF_INFLIGHT_SHMFD = 12,
    VHU_PF_RESET_DEVICE = 13,
    VHU_PF_CONFIGURE_MEM_SLOTS = 15,
};

/* virtio feature bits */
#define VIRTIO_BLK_F_SIZE_MAX      1
#define VIRTIO_BLK_F_SEG_MAX       2
#define VIRTIO_BLK_F_RO            5
#define VIRTIO_BLK_F_BLK_SIZE      6
#define VIRTIO_BLK_F_FLUSH         9
#define VIRTIO_BLK_F_TOPOLOGY      10
#define VIRTIO_BLK_F_CONFIG_WCE    11
#define VIRTIO_BLK_F_MQ            12
#define VIRTIO_BLK_F_DISCARD       13
#define VIRTIO_BLK_F_WRITE_ZEROES  14
#define VHOST_F_LOG_ALL            26
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX    29
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VIRTIO_F_VERSION_1         32

#define VHU_BIT(n) (1ull << (n))

/* the vring index field of SET_VRING_KICK/CALL/ERR */
#define VHU_VRING_IDX_MASK 0xffu
#define VHU_VRING_NOFD     0x100u

#define VHU_MAX_FDS        8     /* SET_MEM_TABLE carries at most 8 regions */
#define VHU_MAX_PAYLOAD    4096
#define VHU_CONFIG_MAX     256

struct vhu_hdr {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
} __attribute__((packed));

struct vhu_vring_state { uint32_t index, num; };
struct vhu_vring_addr {
    uint32_t index, flags;
    uint64_t desc, used, avail, log;
};
struct vhu_region {
    uint64_t gpa, size, uaddr, mmap_offset;
};
struct vhu_mem_table {
    uint32_t nregions, padding;
    struct vhu_region r[VHU_MAX_FDS];
};
struct vhu_mem_single {
    uint64_t padding;
    struct vhu_region r;
};
struct vhu_config {
    uint32_t offset, size, flags;
    uint8_t data[VHU_CONFIG_MAX];
};
struct vhu_log_desc {
    uint64_t mmap_size, mmap_offset;
};
struct vhu_inflight {
    uint64_t mmap_size, mmap_offset;
    uint16_t num_queues, queue_size;
    uint32_t padding;
};

struct vhu_msg {
    struct vhu_hdr hdr;
    union {
        uint64_t u64;
        struct vhu_vring_state state;
        struct vhu_vring_addr addr;
        struct vhu_mem_table mem;
        struct vhu_mem_single mreg;
        struct vhu_config config;
        struct vhu_inflight inflight;
        struct vhu_log_desc log;
        uint8_t raw[VHU_MAX_PAYLOAD];
    };
    int fds[VHU_MAX_FDS];
    int nfds;
};

/* Receive one message with its fds; fds beyond what the message uses are
 * the caller's to close (vhu_msg_close_fds). 0, -EPIPE on EOF, or -errno. */
int  vhu_msg_recv(int sock, struct vhu_msg *m);
/* Send header + hdr.size payload bytes with nfds fds. */
int  vhu_msg_send(int sock, const struct vhu_msg *m);
void vhu_msg_close_fds(struct vhu_msg *m);

/* Inflight tracking region (vhost-user.rst, "Inflight I/O tracking"),
 * split virtqueues. */
struct vhu_inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};
struct vhu_inflight_queue {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct vhu_inflight_desc desc[];
};
static inline size_t vhu_inflight_queue_size(unsigned qsize)
{
    size_t n = sizeof(struct vhu_inflight_queue) + qsize * sizeof(struct vhu_inflight_desc);
    return (n + 63) & ~(size_t)63;
}

#endif
