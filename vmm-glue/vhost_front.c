/* vhost-user-blk front-end library (see vhost_front.h). Plays the part a
 * VMM plays: guest memory is one or two memfds whose "guest physical"
 * addresses the library assigns, the rings live in the first, and each
 * request slot has its header, discard segment, status byte and indirect
 * table there too. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include "vdisk/error.h"
#include "vmm-glue/vhost_front.h"
#include "vmm-glue/vhost_log.h"
#include "vmm-glue/vhost_proto.h"
#include "vmm-glue/virtio_blk.h"
#include "vmm-glue/virtq.h"

#define SLOT_BYTES 128
#define GPA_BUF_SPLIT (1ull << 32)

struct slot {
    struct virtio_blk_outhdr hdr;        /* 0 */
    struct virtio_blk_dwz_seg seg;       /* 16 */
    uint8_t status;                      /* 32 */
    uint8_t pad[31];
    struct virtq_desc table[4];          /* 64: indirect table */
};
_Static_assert(sizeof(struct slot) == SLOT_BYTES, "slot layout");

struct fq {
    unsigned num, nslots;
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    struct slot *slots;                  /* in shared memory */
    void **cookies;
    uint16_t *free;                      /* stack of free slot numbers */
    unsigned nfree;
    uint16_t avail_idx, kicked_avail, last_used;
    int kick_fd, call_fd;
    uint64_t desc_u, avail_u, used_u;    /* offsets in region 0 */
};

struct vd_vhu {
    char *path;
    int sock;
    struct vd_vhu_opts o;
    uint64_t features, pfeatures;
    bool event_idx, indirect;
    uint64_t capacity;
    /* memory: region 0 (rings, slots[, buffers]), region 1 (buffers) */
    int memfd[2];
    uint8_t *mem[2];
    size_t memsize[2];
    uint64_t gpa[2];
    int nregions;
    uint8_t *buf;
    size_t buf_size;
    int inflight_fd;
    uint64_t inflight_size;
    int backend_fd;                      /* our end of the back-end's channel */
    uint64_t offered;                    /* the back-end's features */
    bool log_on;
    int log_fd;
    uint8_t *log;
    size_t log_size;
    struct fq q[VHU_MAX_FDS * 8];
};

/* ---- messages ---- */

static int xfer(struct vd_vhu *f, struct vhu_msg *m, bool want_reply)
{
    uint32_t req = m->hdr.request;
    bool ack = !want_reply && (f->pfeatures & VHU_BIT(VHU_PF_REPLY_ACK));
    m->hdr.flags = VHU_VERSION | (ack ? VHU_FLAG_NEED_REPLY : 0);
    int rc = vhu_msg_send(f->sock, m);
    if (rc < 0) return vd_err(rc, "%s: send request %u: %s", f->path, req, strerror(-rc));
    if (!want_reply && !ack) return 0;
    rc = vhu_msg_recv(f->sock, m);
    if (rc < 0) return vd_err(rc, "%s: reply to request %u: %s", f->path, req, strerror(-rc));
    if (m->hdr.request != req || !(m->hdr.flags & VHU_FLAG_REPLY)) {
        vhu_msg_close_fds(m);
        return vd_err(-EPROTO, "%s: reply to request %u is for %u", f->path, req, m->hdr.request);
    }
    if (ack) {
        if (m->hdr.size < 8) return vd_err(-EPROTO, "%s: short ack for %u", f->path, req);
        if (m->u64) return vd_err(-EIO, "%s: back-end refused request %u (%llu)", f->path, req,
                                  (unsigned long long)m->u64);
    }
    return 0;
}

static int simple(struct vd_vhu *f, uint32_t req, uint64_t *u64_in_out, bool reply)
{
    struct vhu_msg m = { .hdr = { req, 0, u64_in_out && !reply ? 8 : 0 } };
    if (u64_in_out && !reply) m.u64 = *u64_in_out;
    int rc = xfer(f, &m, reply);
    if (rc < 0) return rc;
    if (reply) {
        if (m.hdr.size < 8) return vd_err(-EPROTO, "%s: short reply to %u", f->path, req);
        *u64_in_out = m.u64;
    }
    return 0;
}

static int vring_state(struct vd_vhu *f, uint32_t req, unsigned idx, unsigned num)
{
    struct vhu_msg m = { .hdr = { req, 0, sizeof(m.state) } };
    m.state.index = idx;
    m.state.num = num;
    return xfer(f, &m, false);
}

static int vring_fd(struct vd_vhu *f, uint32_t req, unsigned idx, int fd)
{
    struct vhu_msg m = { .hdr = { req, 0, 8 } };
    m.u64 = idx;
    m.fds[0] = fd;
    m.nfds = 1;
    return xfer(f, &m, false);
}

static uint64_t gpa_of(const struct vd_vhu *f, const void *p, size_t len, bool *ok)
{
    for (int i = 0; i < f->nregions; i++) {
        const uint8_t *b = f->mem[i];
        if ((const uint8_t *)p >= b && (const uint8_t *)p + len <= b + f->memsize[i]) {
            *ok = true;
            return f->gpa[i] + ((const uint8_t *)p - b);
        }
    }
    *ok = false;
    return 0;
}

/* ---- set-up ---- */

static int get_config(struct vd_vhu *f)
{
    struct vhu_msg m = { .hdr = { VHU_GET_CONFIG, 0, 12 + 60 } };
    m.config.offset = 0;
    m.config.size = 60;
    int rc = xfer(f, &m, true);
    if (rc < 0) return rc;
    if (m.hdr.size != 12 + 60) return vd_err(-EPROTO, "%s: GET_CONFIG failed", f->path);
    struct virtio_blk_config c;
    memcpy(&c, m.config.data, 60);
    f->capacity = c.capacity * VIRTIO_BLK_SECTOR;
    return 0;
}

int vd_vhu_refresh_config(struct vd_vhu *f)
{
    return get_config(f);
}

static int send_memory(struct vd_vhu *f)
{
    struct vhu_msg m;
    if (f->pfeatures & VHU_BIT(VHU_PF_CONFIGURE_MEM_SLOTS)) {
        uint64_t slots;
        int rc = simple(f, VHU_GET_MAX_MEM_SLOTS, &slots, true);
        if (rc < 0) return rc;
        if (slots < (uint64_t)f->nregions) return vd_err(-ENOSPC, "%s: too few memory slots", f->path);
        for (int i = 0; i < f->nregions; i++) {
            memset(&m, 0, offsetof(struct vhu_msg, raw) + sizeof(struct vhu_mem_single));
            m.hdr = (struct vhu_hdr){ VHU_ADD_MEM_REG, 0, sizeof(struct vhu_mem_single) };
            m.mreg.r = (struct vhu_region){ f->gpa[i], f->memsize[i], (uintptr_t)f->mem[i], 0 };
            m.fds[0] = f->memfd[i];
            m.nfds = 1;
            if ((rc = xfer(f, &m, false)) < 0) return rc;
        }
        return 0;
    }
    memset(&m, 0, sizeof(m));
    m.hdr = (struct vhu_hdr){ VHU_SET_MEM_TABLE, 0, 8 + f->nregions * sizeof(struct vhu_region) };
    m.mem.nregions = f->nregions;
    for (int i = 0; i < f->nregions; i++) {
        m.mem.r[i] = (struct vhu_region){ f->gpa[i], f->memsize[i], (uintptr_t)f->mem[i], 0 };
        m.fds[i] = f->memfd[i];
    }
    m.nfds = f->nregions;
    return xfer(f, &m, false);
}

static int send_inflight(struct vd_vhu *f)
{
    struct vhu_msg m;
    int rc;
    if (!(f->pfeatures & VHU_BIT(VHU_PF_INFLIGHT_SHMFD))) return 0;
    if (f->inflight_fd < 0) {
        memset(&m, 0, sizeof(m));
        m.hdr = (struct vhu_hdr){ VHU_GET_INFLIGHT_FD, 0, sizeof(struct vhu_inflight) };
        m.inflight.num_queues = f->o.num_queues;
        m.inflight.queue_size = f->o.queue_size;
        if ((rc = xfer(f, &m, true)) < 0) return rc;
        if (m.nfds != 1 || m.hdr.size < sizeof(struct vhu_inflight) || !m.inflight.mmap_size) {
            vhu_msg_close_fds(&m);
            return vd_err(-EPROTO, "%s: GET_INFLIGHT_FD gave no region", f->path);
        }
        f->inflight_fd = m.fds[0];
        f->inflight_size = m.inflight.mmap_size;
        if (m.inflight.mmap_offset) {
            close(f->inflight_fd);
            f->inflight_fd = -1;
            return vd_err(-EPROTO, "%s: inflight region at an offset", f->path);
        }
    }
    memset(&m, 0, sizeof(m));
    m.hdr = (struct vhu_hdr){ VHU_SET_INFLIGHT_FD, 0, sizeof(struct vhu_inflight) };
    m.inflight.mmap_size = f->inflight_size;
    m.inflight.num_queues = f->o.num_queues;
    m.inflight.queue_size = f->o.queue_size;
    m.fds[0] = f->inflight_fd;
    m.nfds = 1;
    return xfer(f, &m, false);
}

/* ---- dirty logging ---- */

static int send_log_base(struct vd_vhu *f)
{
    struct vhu_msg m = { .hdr = { VHU_SET_LOG_BASE, 0, sizeof(struct vhu_log_desc) } };
    m.log.mmap_size = f->log_size;
    m.log.mmap_offset = 0;
    m.fds[0] = f->log_fd;
    m.nfds = 1;
    /* With LOG_SHMFD the back-end replies once it has mapped the log. The
     * payload means nothing (libvhost-user echoes the size back). */
    int rc = xfer(f, &m, true);
    vhu_msg_close_fds(&m);
    return rc;
}

static int map_memfd(const char *name, size_t size, int *fd, uint8_t **p);

int vd_vhu_log_enable(struct vd_vhu *f, bool on)
{
    int rc;
    if (on && (!(f->offered & VHU_BIT(VHOST_F_LOG_ALL)) || !(f->pfeatures & VHU_BIT(VHU_PF_LOG_SHMFD))))
        return vd_err(-ENOTSUP, "%s: the back-end offers no dirty logging", f->path);
    if (on && !f->log) {
        uint64_t top = 0;
        for (int i = 0; i < f->nregions; i++)
            if (f->gpa[i] + f->memsize[i] > top) top = f->gpa[i] + f->memsize[i];
        f->log_size = (top / 4096 + 7) / 8;
        if ((rc = map_memfd("vdisk-vhu-log", f->log_size, &f->log_fd, &f->log)) < 0) return rc;
    }
    if (on && (rc = send_log_base(f)) < 0) return rc;
    f->log_on = on;
    uint64_t set = on ? f->features | VHU_BIT(VHOST_F_LOG_ALL) : f->features;
    if ((rc = simple(f, VHU_SET_FEATURES, &set, false)) < 0) return rc;
    for (unsigned i = 0; i < f->o.num_queues; i++) {
        struct fq *q = &f->q[i];
        struct vhu_msg m = { .hdr = { VHU_SET_VRING_ADDR, 0, sizeof(struct vhu_vring_addr) } };
        m.addr.index = i;
        m.addr.desc = (uintptr_t)q->desc;
        m.addr.avail = (uintptr_t)q->avail;
        m.addr.used = (uintptr_t)q->used;
        m.addr.flags = on ? VHU_VRING_F_LOG : 0;
        m.addr.log = f->gpa[0] + q->used_u;
        if ((rc = xfer(f, &m, false)) < 0) return rc;
    }
    return 0;
}

uint8_t *vd_vhu_log_bits(const struct vd_vhu *f, size_t *size)
{
    if (size) *size = f->log_size;
    return f->log;
}

uint64_t vd_vhu_gpa(const struct vd_vhu *f, const void *p)
{
    bool ok;
    uint64_t g = gpa_of(f, p, 1, &ok);
    return ok ? g : UINT64_MAX;
}

void vd_vhu_queue_layout(const struct vd_vhu *f, unsigned qi, struct vd_vhu_qlayout *l)
{
    const struct fq *q = &f->q[qi];
    l->used = f->gpa[0] + q->used_u;
    l->used_len = virtq_used_bytes(q->num);
    l->slots = vd_vhu_gpa(f, q->slots);
    l->slots_len = (uint64_t)q->num * SLOT_BYTES;
}

static int start_queue(struct vd_vhu *f, unsigned i)
{
    struct fq *q = &f->q[i];
    int rc;
    struct vhu_msg m = { .hdr = { VHU_SET_VRING_ADDR, 0, sizeof(struct vhu_vring_addr) } };
    m.addr.index = i;
    m.addr.desc = (uintptr_t)q->desc;
    m.addr.avail = (uintptr_t)q->avail;
    m.addr.used = (uintptr_t)q->used;
    if (f->log_on) {
        m.addr.flags = VHU_VRING_F_LOG;
        m.addr.log = f->gpa[0] + q->used_u;
    }
    /* Restart where the back-end must: everything not yet returned is
     * either in its inflight region or still to be taken from avail. */
    uint16_t base = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    if ((rc = vring_state(f, VHU_SET_VRING_NUM, i, q->num)) < 0 ||
        (rc = vring_state(f, VHU_SET_VRING_BASE, i, base)) < 0 ||
        (rc = xfer(f, &m, false)) < 0 ||
        (rc = vring_fd(f, VHU_SET_VRING_CALL, i, q->call_fd)) < 0 ||
        (rc = vring_fd(f, VHU_SET_VRING_KICK, i, q->kick_fd)) < 0 ||
        (rc = vring_state(f, VHU_SET_VRING_ENABLE, i, 1)) < 0)
        return rc;
    return 0;
}

static int sock_connect(const char *path, int *out)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(a.sun_path)) return -ENAMETOOLONG;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    *out = fd;
    return 0;
}

static int negotiate(struct vd_vhu *f)
{
    uint64_t feat = 0, pf = 0, nq = 0;
    int rc;
    if ((rc = simple(f, VHU_GET_FEATURES, &feat, true)) < 0) return rc;
    f->offered = feat;
    if (!(feat & VHU_BIT(VIRTIO_F_VERSION_1)) || !(feat & VHU_BIT(VHOST_USER_F_PROTOCOL_FEATURES)))
        return vd_err(-ENOTSUP, "%s: back-end lacks VERSION_1 or protocol features", f->path);
    if ((rc = simple(f, VHU_GET_PROTOCOL_FEATURES, &pf, true)) < 0) return rc;
    uint64_t want_pf = VHU_BIT(VHU_PF_MQ) | VHU_BIT(VHU_PF_REPLY_ACK) | VHU_BIT(VHU_PF_CONFIG) |
                       VHU_BIT(VHU_PF_LOG_SHMFD) |
                       VHU_BIT(VHU_PF_CONFIGURE_MEM_SLOTS) | VHU_BIT(VHU_PF_BACKEND_REQ);
    if (!f->o.no_inflight) want_pf |= VHU_BIT(VHU_PF_INFLIGHT_SHMFD);
    pf &= want_pf;
    if (!(pf & VHU_BIT(VHU_PF_CONFIG)))
        return vd_err(-ENOTSUP, "%s: back-end lacks the CONFIG protocol feature", f->path);
    if ((rc = simple(f, VHU_SET_PROTOCOL_FEATURES, &pf, false)) < 0) return rc;
    f->pfeatures = pf;
    if (pf & VHU_BIT(VHU_PF_MQ)) {
        if ((rc = simple(f, VHU_GET_QUEUE_NUM, &nq, true)) < 0) return rc;
        if (nq < f->o.num_queues)
            return vd_err(-EINVAL, "%s: back-end has %llu queues, %u wanted", f->path,
                          (unsigned long long)nq, f->o.num_queues);
    }
    if ((rc = simple(f, VHU_SET_OWNER, NULL, false)) < 0) return rc;
    if (pf & VHU_BIT(VHU_PF_BACKEND_REQ)) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return -errno;
        struct vhu_msg m = { .hdr = { VHU_SET_BACKEND_REQ_FD, 0, 0 } };
        m.fds[0] = sv[1];
        m.nfds = 1;
        rc = xfer(f, &m, false);
        close(sv[1]);
        if (rc < 0) { close(sv[0]); return rc; }
        if (f->backend_fd >= 0) close(f->backend_fd);
        f->backend_fd = sv[0];
    }
    uint64_t want = VHU_BIT(VIRTIO_F_VERSION_1) | VHU_BIT(VHOST_USER_F_PROTOCOL_FEATURES) |
                    VHU_BIT(VIRTIO_BLK_F_FLUSH) | VHU_BIT(VIRTIO_BLK_F_DISCARD) |
                    VHU_BIT(VIRTIO_BLK_F_WRITE_ZEROES) | VHU_BIT(VIRTIO_BLK_F_MQ) |
                    VHU_BIT(VIRTIO_BLK_F_BLK_SIZE) | VHU_BIT(VIRTIO_BLK_F_SEG_MAX) |
                    VHU_BIT(VIRTIO_BLK_F_SIZE_MAX) | VHU_BIT(VIRTIO_BLK_F_TOPOLOGY) |
                    VHU_BIT(VIRTIO_BLK_F_RO) | VHU_BIT(VIRTIO_BLK_F_CONFIG_WCE);
    if (!f->o.no_indirect) want |= VHU_BIT(VIRTIO_RING_F_INDIRECT_DESC);
    if (!f->o.no_event_idx) want |= VHU_BIT(VIRTIO_RING_F_EVENT_IDX);
    feat &= want;
    if (f->features && feat != f->features)
        return vd_err(-EPROTO, "%s: the back-end's features changed across a reconnect", f->path);
    if (f->log_on && (!(f->offered & VHU_BIT(VHOST_F_LOG_ALL)) || !(pf & VHU_BIT(VHU_PF_LOG_SHMFD))))
        return vd_err(-ENOTSUP, "%s: dirty logging is on but the back-end cannot log", f->path);
    uint64_t set = f->log_on ? feat | VHU_BIT(VHOST_F_LOG_ALL) : feat;
    if ((rc = simple(f, VHU_SET_FEATURES, &set, false)) < 0) return rc;
    f->features = feat;
    f->event_idx = feat & VHU_BIT(VIRTIO_RING_F_EVENT_IDX);
    f->indirect = feat & VHU_BIT(VIRTIO_RING_F_INDIRECT_DESC);
    if ((rc = get_config(f)) < 0) return rc;
    if ((rc = send_memory(f)) < 0) return rc;
    if ((rc = send_inflight(f)) < 0) return rc;
    if (f->log_on && (rc = send_log_base(f)) < 0) return rc;
    for (unsigned i = 0; i < f->o.num_queues; i++)
        if ((rc = start_queue(f, i)) < 0) return rc;
    return 0;
}

static int map_memfd(const char *name, size_t size, int *fd, uint8_t **p)
{
    *fd = memfd_create(name, MFD_CLOEXEC);
    if (*fd < 0) return -errno;
    if (ftruncate(*fd, size) < 0) return -errno;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    if (m == MAP_FAILED) return -errno;
    *p = m;
    return 0;
}

static size_t align_up(size_t v, size_t a) { return (v + a - 1) & ~(a - 1); }

int vd_vhu_connect(const char *path, const struct vd_vhu_opts *o_in, struct vd_vhu **out)
{
    struct vd_vhu_opts o = o_in ? *o_in : (struct vd_vhu_opts){ 0 };
    if (!o.num_queues) o.num_queues = 1;
    if (!o.queue_size) o.queue_size = 128;
    if (!o.buf_size) o.buf_size = 64u << 20;
    if (o.num_queues > sizeof(((struct vd_vhu *)0)->q) / sizeof(struct fq) ||
        o.queue_size < 4 || o.queue_size > 32768 || (o.queue_size & (o.queue_size - 1)))
        return vd_err(-EINVAL, "%s: bad queue count or size", path);
    o.buf_size = align_up(o.buf_size, 4096);

    struct vd_vhu *f = calloc(1, sizeof(*f));
    if (!f) return -ENOMEM;
    f->o = o;
    f->sock = f->inflight_fd = f->backend_fd = f->log_fd = -1;
    f->memfd[0] = f->memfd[1] = -1;
    f->path = strdup(path);
    int rc = f->path ? 0 : -ENOMEM;

    /* lay out region 0 */
    size_t off = 0, num = o.queue_size;
    for (unsigned i = 0; i < o.num_queues; i++) {
        struct fq *q = &f->q[i];
        q->num = num;
        q->desc_u = off;   off = align_up(off + virtq_desc_bytes(num), 4096);
        q->avail_u = off;  off = align_up(off + virtq_avail_bytes(num), 4096);
        q->used_u = off;   off = align_up(off + virtq_used_bytes(num), 4096);
        off = align_up(off + num * SLOT_BYTES, 4096);
    }
    size_t ctl = off;
    f->nregions = o.split_memory ? 2 : 1;
    f->memsize[0] = o.split_memory ? ctl : ctl + o.buf_size;
    if (!rc) rc = map_memfd("vdisk-vhu-mem", f->memsize[0], &f->memfd[0], &f->mem[0]);
    if (!rc && o.split_memory) {
        f->memsize[1] = o.buf_size;
        f->gpa[1] = GPA_BUF_SPLIT;
        rc = map_memfd("vdisk-vhu-buf", f->memsize[1], &f->memfd[1], &f->mem[1]);
    }
    if (rc < 0) goto fail;
    f->buf = o.split_memory ? f->mem[1] : f->mem[0] + ctl;
    f->buf_size = o.buf_size;
    for (unsigned i = 0; i < o.num_queues; i++) {
        struct fq *q = &f->q[i];
        q->desc = (void *)(f->mem[0] + q->desc_u);
        q->avail = (void *)(f->mem[0] + q->avail_u);
        q->used = (void *)(f->mem[0] + q->used_u);
        q->slots = (void *)(f->mem[0] + q->used_u + align_up(virtq_used_bytes(num), 4096));
        q->cookies = calloc(num, sizeof(void *));
        q->free = calloc(num, sizeof(uint16_t));
        q->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        q->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (!q->cookies || !q->free || q->kick_fd < 0 || q->call_fd < 0) { rc = -ENOMEM; goto fail; }
    }
    if ((rc = sock_connect(path, &f->sock)) < 0) {
        rc = vd_err(rc, "%s: cannot connect: %s", path, strerror(-rc));
        goto fail;
    }
    if ((rc = negotiate(f)) < 0) goto fail;
    for (unsigned i = 0; i < o.num_queues; i++) {
        struct fq *q = &f->q[i];
        q->nslots = f->indirect ? num : num / 3;
        for (unsigned s = 0; s < q->nslots; s++) q->free[q->nfree++] = q->nslots - 1 - s;
    }
    *out = f;
    return 0;
fail:
    vd_vhu_close(f);
    return rc;
}

void vd_vhu_close(struct vd_vhu *f)
{
    if (!f) return;
    if (f->sock >= 0) close(f->sock);
    for (unsigned i = 0; i < f->o.num_queues; i++) {
        struct fq *q = &f->q[i];
        free(q->cookies);
        free(q->free);
        if (q->kick_fd > 0) close(q->kick_fd);
        if (q->call_fd > 0) close(q->call_fd);
    }
    for (int i = 0; i < 2; i++) {
        if (f->mem[i]) munmap(f->mem[i], f->memsize[i]);
        if (f->memfd[i] >= 0) close(f->memfd[i]);
    }
    if (f->inflight_fd >= 0) close(f->inflight_fd);
    if (f->backend_fd >= 0) close(f->backend_fd);
    if (f->log) munmap(f->log, f->log_size);
    if (f->log_fd >= 0) close(f->log_fd);
    free(f->path);
    free(f);
}

int vd_vhu_reconnect(struct vd_vhu *f, int timeout_ms)
{
    struct timespec t0, t;
    int rc;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (f->sock >= 0) close(f->sock);
    f->sock = -1;
    for (;;) {
        rc = sock_connect(f->path, &f->sock);
        if (rc == 0) {
            f->pfeatures = 0;
            rc = negotiate(f);
            if (rc == 0) break;
            close(f->sock);
            f->sock = -1;
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        long ms = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms >= timeout_ms) {
            char why[256];
            snprintf(why, sizeof(why), "%s", vd_errmsg(rc));
            return vd_err(rc, "cannot reconnect: %s", why);
        }
        usleep(20000);
    }
    for (unsigned i = 0; i < f->o.num_queues; i++) {
        f->q[i].kicked_avail = f->q[i].avail_idx;
        eventfd_write(f->q[i].kick_fd, 1);    /* whatever the new back-end asked for */
    }
    return 0;
}

uint64_t vd_vhu_capacity(const struct vd_vhu *f) { return f->capacity; }
int vd_vhu_backend_fd(const struct vd_vhu *f) { return f->backend_fd; }

int vd_vhu_backend_msg(struct vd_vhu *f)
{
    struct vhu_msg m;
    int rc = vhu_msg_recv(f->backend_fd, &m);
    if (rc < 0) return rc;
    vhu_msg_close_fds(&m);
    uint32_t req = m.hdr.request;
    bool need = m.hdr.flags & VHU_FLAG_NEED_REPLY;
    int ret = 0;
    if (req == VHU_BACKEND_CONFIG_CHANGE_MSG) {
        rc = get_config(f);
        ret = rc < 0 ? rc : 1;
    }
    if (need) {
        m.hdr = (struct vhu_hdr){ req, VHU_VERSION | VHU_FLAG_REPLY, 8 };
        m.u64 = ret < 0;
        m.nfds = 0;
        if ((rc = vhu_msg_send(f->backend_fd, &m)) < 0) return rc;
    }
    return ret;
}
unsigned vd_vhu_num_queues(const struct vd_vhu *f) { return f->o.num_queues; }
uint64_t vd_vhu_features(const struct vd_vhu *f) { return f->features; }
uint64_t vd_vhu_protocol_features(const struct vd_vhu *f) { return f->pfeatures; }
int vd_vhu_call_fd(const struct vd_vhu *f, unsigned q) { return f->q[q].call_fd; }
int vd_vhu_sock_fd(const struct vd_vhu *f) { return f->sock; }
unsigned vd_vhu_pending(const struct vd_vhu *f, unsigned q) { return f->q[q].nslots - f->q[q].nfree; }

void *vd_vhu_buf(const struct vd_vhu *f, size_t *size)
{
    if (size) *size = f->buf_size;
    return f->buf;
}

/* ---- I/O ---- */

int vd_vhu_submit(struct vd_vhu *f, unsigned qi, const struct vd_vhu_io *io)
{
    if (qi >= f->o.num_queues) return -EINVAL;
    struct fq *q = &f->q[qi];
    struct virtq_desc d[3];
    int nd = 0;
    bool ok = true;
    if (!q->nfree) return -EAGAIN;
    uint16_t s = q->free[q->nfree - 1];
    struct slot *sl = &q->slots[s];
    static const uint32_t types[] = { VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH,
                                      VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
                                      VIRTIO_BLK_T_GET_ID };
    if ((unsigned)io->op >= sizeof(types) / sizeof(types[0])) return -EINVAL;
    sl->hdr = (struct virtio_blk_outhdr){ types[io->op], 0, io->off / VIRTIO_BLK_SECTOR };
    sl->status = 0xff;
    d[nd++] = (struct virtq_desc){ gpa_of(f, &sl->hdr, sizeof(sl->hdr), &ok), sizeof(sl->hdr), 0, 0 };
    switch (io->op) {
    case VD_VHU_READ: case VD_VHU_WRITE: case VD_VHU_GET_ID:
        if (io->len) {
            d[nd++] = (struct virtq_desc){ gpa_of(f, io->buf, io->len, &ok), io->len,
                                           io->op == VD_VHU_WRITE ? 0 : VIRTQ_DESC_F_WRITE, 0 };
            if (!ok || (uint8_t *)io->buf < f->buf || (uint8_t *)io->buf + io->len > f->buf + f->buf_size)
                return -EINVAL;
        }
        break;
    case VD_VHU_DISCARD: case VD_VHU_WRITE_ZEROES:
        sl->hdr.sector = 0;
        sl->seg = (struct virtio_blk_dwz_seg){ io->off / VIRTIO_BLK_SECTOR, io->len / VIRTIO_BLK_SECTOR,
                                               io->unmap ? VIRTIO_BLK_WZ_F_UNMAP : 0 };
        d[nd++] = (struct virtq_desc){ gpa_of(f, &sl->seg, sizeof(sl->seg), &ok), sizeof(sl->seg), 0, 0 };
        break;
    case VD_VHU_FLUSH:
        break;
    }
    d[nd++] = (struct virtq_desc){ gpa_of(f, &sl->status, 1, &ok), 1, VIRTQ_DESC_F_WRITE, 0 };
    q->nfree--;
    q->cookies[s] = io->cookie;
    uint16_t head;
    if (f->indirect) {
        for (int i = 0; i < nd; i++) {
            d[i].flags |= i + 1 < nd ? VIRTQ_DESC_F_NEXT : 0;
            d[i].next = i + 1;
            sl->table[i] = d[i];
        }
        head = s;
        q->desc[head] = (struct virtq_desc){ gpa_of(f, sl->table, nd * sizeof(d[0]), &ok),
                                             nd * sizeof(d[0]), VIRTQ_DESC_F_INDIRECT, 0 };
    } else {
        head = s * 3;
        for (int i = 0; i < nd; i++) {
            d[i].flags |= i + 1 < nd ? VIRTQ_DESC_F_NEXT : 0;
            d[i].next = head + i + 1;
            q->desc[head + i] = d[i];
        }
    }
    q->avail->ring[q->avail_idx % q->num] = head;
    q->avail_idx++;
    __atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
    return 0;
}

void vd_vhu_kick(struct vd_vhu *f, unsigned qi)
{
    struct fq *q = &f->q[qi];
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t old = q->kicked_avail, new = q->avail_idx;
    if (old == new) return;
    q->kicked_avail = new;
    bool need;
    if (f->event_idx) {
        uint16_t ev = __atomic_load_n((uint16_t *)&q->used->ring[q->num], __ATOMIC_ACQUIRE);
        need = (uint16_t)(new - ev - 1) < (uint16_t)(new - old);
    } else {
        need = !(__atomic_load_n(&q->used->flags, __ATOMIC_ACQUIRE) & VIRTQ_USED_F_NO_NOTIFY);
    }
    if (need) eventfd_write(q->kick_fd, 1);
}

int vd_vhu_reap(struct vd_vhu *f, unsigned qi, struct vd_vhu_done *out, int max)
{
    struct fq *q = &f->q[qi];
    int n = 0;
    uint16_t used = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    while (n < max && q->last_used != used) {
        struct virtq_used_elem e = q->used->ring[q->last_used % q->num];
        q->last_used++;
        unsigned s = f->indirect ? e.id : e.id / 3;
        if (s >= q->nslots || (!f->indirect && e.id % 3)) continue;   /* not ours */
        out[n].cookie = q->cookies[s];
        out[n].status = __atomic_load_n(&q->slots[s].status, __ATOMIC_ACQUIRE);
        out[n].used_len = e.len;
        n++;
        q->free[q->nfree++] = s;
    }
    return n;
}

bool vd_vhu_arm(struct vd_vhu *f, unsigned qi)
{
    struct fq *q = &f->q[qi];
    if (f->event_idx)
        __atomic_store_n((uint16_t *)&q->avail->ring[q->num], q->last_used, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->last_used;
}

int vd_vhu_wait(struct vd_vhu *f, unsigned qi, int timeout_ms)
{
    struct fq *q = &f->q[qi];
    if (vd_vhu_arm(f, qi)) return 1;
    struct pollfd p[2] = { { q->call_fd, POLLIN, 0 }, { f->sock, POLLIN, 0 } };
    int rc = poll(p, 2, timeout_ms);
    if (rc < 0) return errno == EINTR ? 0 : -errno;
    if (p[1].revents) {
        char c;
        if (recv(f->sock, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0) return -EPIPE;
    }
    if (p[0].revents) {
        eventfd_t v;
        eventfd_read(q->call_fd, &v);
        return 1;
    }
    return __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->last_used;
}
