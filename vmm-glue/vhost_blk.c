/* vhost-user-blk back-end: the export object, its threads, and the
 * control thread that accepts one front-end at a time and answers its
 * vhost-user messages. Queue state that a running ring uses is only changed
 * on the queue's own thread (vhost_blk_queue.c). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include "vdisk/error.h"
#include "vmm-glue/vhost_blk_int.h"

static uint64_t offered_features(const struct vd_vhost_blk *b)
{
    uint64_t f = VHU_BIT(VIRTIO_F_VERSION_1) | VHU_BIT(VHOST_USER_F_PROTOCOL_FEATURES) |
                 VHU_BIT(VIRTIO_RING_F_INDIRECT_DESC) | VHU_BIT(VIRTIO_RING_F_EVENT_IDX) |
                 VHU_BIT(VIRTIO_BLK_F_SIZE_MAX) | VHU_BIT(VIRTIO_BLK_F_SEG_MAX) |
                 VHU_BIT(VIRTIO_BLK_F_BLK_SIZE) | VHU_BIT(VIRTIO_BLK_F_TOPOLOGY) |
                 VHU_BIT(VIRTIO_BLK_F_FLUSH) | VHU_BIT(VIRTIO_BLK_F_CONFIG_WCE) |
                 VHU_BIT(VIRTIO_BLK_F_MQ) | VHU_BIT(VHOST_F_LOG_ALL);
    if (b->o.readonly) f |= VHU_BIT(VIRTIO_BLK_F_RO);
    else f |= VHU_BIT(VIRTIO_BLK_F_DISCARD) | VHU_BIT(VIRTIO_BLK_F_WRITE_ZEROES);
    return f;
}

static const uint64_t offered_pfeatures =
    VHU_BIT(VHU_PF_MQ) | VHU_BIT(VHU_PF_LOG_SHMFD) | VHU_BIT(VHU_PF_REPLY_ACK) | VHU_BIT(VHU_PF_BACKEND_REQ) |
    VHU_BIT(VHU_PF_CONFIG) | VHU_BIT(VHU_PF_INFLIGHT_SHMFD) |
    VHU_BIT(VHU_PF_RESET_DEVICE) | VHU_BIT(VHU_PF_CONFIGURE_MEM_SLOTS);

void vhb_config(struct vd_vhost_blk *b, struct virtio_blk_config *c)
{
    uint32_t bs = b->o.logical_block_size;
    memset(c, 0, sizeof(*c));
    c->capacity = vd_disk_size(b->disk) / VIRTIO_BLK_SECTOR;
    c->size_max = 1u << 22;
    c->seg_max = VHB_SEG_MAX;
    c->blk_size = bs;
    c->physical_block_exp = bs < 4096 ? 3 : 0;      /* 4 KiB physical blocks */
    c->min_io_size = 1;
    c->opt_io_size = 0;
    c->writeback = __atomic_load_n(&b->wce, __ATOMIC_RELAXED);
    c->num_queues = b->o.num_queues;
    c->max_discard_sectors = VHB_MAX_DWZ_SECTORS;
    c->max_discard_seg = 1;
    c->discard_sector_alignment = 4096 / VIRTIO_BLK_SECTOR;
    c->max_write_zeroes_sectors = VHB_MAX_DWZ_SECTORS;
    c->max_write_zeroes_seg = 1;
    c->write_zeroes_may_unmap = 1;
}

/* ---- queues ---- */

static void queue_reset(struct vhb_queue *q)
{
    if (q->running) {
        vhb_queue_stop(q);
        q->running = false;
    }
    if (q->kick_fd >= 0) close(q->kick_fd);
    if (q->call_fd >= 0) close(q->call_fd);
    if (q->err_fd >= 0) close(q->err_fd);
    q->kick_fd = q->call_fd = q->err_fd = -1;
    q->num = 0;
    q->have_addr = false;
    q->base = 0;
    q->enabled = false;
}

/* Translate a queue's rings with table t (NULLs when they are not mapped). */
static void ring_ptrs(struct vhb_queue *q, const struct vhu_mtab *t, struct vhb_start *s)
{
    s->desc = vhu_uva(t, q->addr.desc, virtq_desc_bytes(q->num));
    s->avail = vhu_uva(t, q->addr.avail, virtq_avail_bytes(q->num));
    s->used = vhu_uva(t, q->addr.used, virtq_used_bytes(q->num));
}

/* What a queue logs: nothing unless the front-end has VHOST_F_LOG_ALL on
 * and gave a log; the used ring too when the ring's VHOST_VRING_F_LOG is set. */
static void queue_log(struct vd_vhost_blk *b, struct vhb_queue *q, struct vhb_start *s)
{
    s->log = b->log && (b->features & VHU_BIT(VHOST_F_LOG_ALL)) ? b->log : NULL;
    s->log_used = s->log && (q->addr.flags & VHU_VRING_F_LOG);
    s->log_used_gpa = q->addr.log;
    if (s->log_used && q->num) {
        uint64_t last = q->addr.log + virtq_used_bytes(q->num) - 1;
        if (last < q->addr.log || last / VHU_LOG_PAGE / 8 >= s->log->size) {
            /* the spec wants the whole ring inside the log */
            fprintf(stderr, "vdisk: vhost-user-blk %s: queue %u: the used ring's log address 0x%llx "
                    "is past the log's end; its writes cannot be logged\n", b->path, q->index,
                    (unsigned long long)q->addr.log);
            s->log_used = false;
        }
    }
}

/* Tell every running queue what to log now. */
static void update_logs(struct vd_vhost_blk *b)
{
    for (unsigned i = 0; i < b->o.num_queues; i++) {
        struct vhb_queue *q = &b->q[i];
        if (!q->running) continue;
        struct vhb_start s = { 0 };
        queue_log(b, q, &s);
        vhb_queue_set_log(q, s.log, s.log_used, s.log_used_gpa);
    }
}

static int handle_log_base(struct vd_vhost_blk *b, struct vhu_msg *m)
{
    struct vhu_log *l, *old = b->log;
    if (!(b->pfeatures & VHU_BIT(VHU_PF_LOG_SHMFD)) || m->nfds != 1 ||
        m->hdr.size < sizeof(struct vhu_log_desc))
        return vd_err(-EINVAL, "SET_LOG_BASE: needs LOG_SHMFD, one fd and the log's size and offset");
    int rc = vhu_log_map(m->fds[0], m->log.mmap_size, m->log.mmap_offset, &l);
    if (rc < 0) return rc;
    b->log = l;
    update_logs(b);       /* no queue uses the old log after this */
    vhu_log_free(old);
    return 0;
}

static int queue_try_start(struct vd_vhost_blk *b, struct vhb_queue *q)
{
    struct vhb_start s = { 0 };
    if (q->running || q->kick_fd < 0 || !q->have_addr || !q->num || !b->mt) return 0;
    ring_ptrs(q, b->mt, &s);
    if (!s.desc || !s.avail || !s.used)
        return vd_err(-EFAULT, "queue %u: ring addresses are outside guest memory", q->index);
    s.base = q->base;
    queue_log(b, q, &s);
    s.event_idx = b->features & VHU_BIT(VIRTIO_RING_F_EVENT_IDX);
    if (b->inflight_map && q->num <= b->inflight_qsize)
        s.inflight = (void *)((char *)b->inflight_map + q->index * vhu_inflight_queue_size(b->inflight_qsize));
    s.mt = vhu_mtab_ref(b->mt);
    int rc = vhb_queue_start(q, &s);
    if (rc < 0) return vd_err(rc, "queue %u: cannot start: %s", q->index, vd_errmsg(rc));
    q->running = true;
    if (rc > 0)
        fprintf(stderr, "vdisk: vhost-user-blk %s: queue %u: resubmitted %d requests in flight\n",
                b->path, q->index, rc);
    if (s.owed_signal)
        fprintf(stderr, "vdisk: vhost-user-blk %s: queue %u: signalled completions returned "
                "before the restart\n", b->path, q->index);
    return 0;
}

static int queue_try_start(struct vd_vhost_blk *b, struct vhb_queue *q);

static void set_mem(struct vd_vhost_blk *b, struct vhu_mtab *t)
{
    struct vhu_mtab *old = b->mt;
    b->mt = t;
    for (unsigned i = 0; i < b->o.num_queues; i++) {
        struct vhb_queue *q = &b->q[i];
        if (!q->running) {
            /* a kick fd that came before any memory: start now */
            int rc = q->kick_fd >= 0 ? queue_try_start(b, q) : 0;
            if (rc < 0)
                fprintf(stderr, "vdisk: vhost-user-blk %s: %s\n", b->path, vd_errmsg(rc));
            continue;
        }
        struct vhb_start s = { .mt = vhu_mtab_ref(t) };
        ring_ptrs(q, t, &s);
        vhb_queue_set_mem(q, &s);
        vhu_mtab_unref(s.mt);
    }
    vhu_mtab_unref(old);
}

static void inflight_unmap(struct vd_vhost_blk *b)
{
    if (b->inflight_map) munmap(b->inflight_map, b->inflight_size);
    b->inflight_map = NULL;
    b->inflight_size = 0;
    b->inflight_qsize = 0;
}

static void device_reset(struct vd_vhost_blk *b)
{
    for (unsigned i = 0; i < b->o.num_queues; i++) queue_reset(&b->q[i]);
}

static void connection_reset(struct vd_vhost_blk *b)
{
    device_reset(b);
    vhu_mtab_unref(b->mt);
    b->mt = NULL;
    vhu_log_free(b->log);
    b->log = NULL;
    inflight_unmap(b);
    pthread_mutex_lock(&b->lock);
    if (b->backend_fd >= 0) close(b->backend_fd);
    b->backend_fd = -1;
    b->connected = false;
    pthread_mutex_unlock(&b->lock);
    b->features = b->pfeatures = 0;
    b->features_acked = false;
    __atomic_store_n(&b->wce, 1, __ATOMIC_RELAXED);
}

/* ---- messages ---- */

static struct vhb_queue *msg_queue(struct vd_vhost_blk *b, uint32_t idx)
{
    return idx < b->o.num_queues ? &b->q[idx] : NULL;
}

static int take_fd(struct vhu_msg *m, int i)
{
    int fd = m->fds[i];
    m->fds[i] = -1;
    return fd;
}

static int handle_mem_table(struct vd_vhost_blk *b, struct vhu_msg *m)
{
    if (m->hdr.size < 8) return -EINVAL;
    uint32_t n = m->mem.nregions;
    if (n > VHU_MAX_FDS || m->hdr.size < 8 + n * sizeof(struct vhu_region) || (int)n != m->nfds)
        return vd_err(-EINVAL, "SET_MEM_TABLE: %u regions with %d fds", n, m->nfds);
    struct vhu_mtab *t = vhu_mtab_new();
    if (!t) return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        int rc = vhu_mtab_add(t, m->fds[i], &m->mem.r[i]);
        if (rc < 0) { vhu_mtab_unref(t); return rc; }
    }
    set_mem(b, t);
    return 0;
}

static int handle_add_reg(struct vd_vhost_blk *b, struct vhu_msg *m)
{
    if (m->hdr.size < sizeof(struct vhu_mem_single) || m->nfds != 1)
        return vd_err(-EINVAL, "ADD_MEM_REG: malformed");
    struct vhu_mtab *t = vhu_mtab_copy(b->mt, NULL, NULL);
    if (!t) return -ENOMEM;
    int rc = vhu_mtab_add(t, m->fds[0], &m->mreg.r);
    if (rc < 0) { vhu_mtab_unref(t); return rc; }
    set_mem(b, t);
    return 0;
}

static int handle_rem_reg(struct vd_vhost_blk *b, struct vhu_msg *m)
{
    bool found;
    if (m->hdr.size < sizeof(struct vhu_mem_single)) return vd_err(-EINVAL, "REM_MEM_REG: malformed");
    struct vhu_mtab *t = vhu_mtab_copy(b->mt, &m->mreg.r, &found);
    if (!t) return -ENOMEM;
    if (!found) { vhu_mtab_unref(t); return vd_err(-ENOENT, "REM_MEM_REG: no such region"); }
    set_mem(b, t);
    return 0;
}

static int handle_get_inflight(struct vd_vhost_blk *b, struct vhu_msg *m, int *reply_fd)
{
    if (m->hdr.size < sizeof(struct vhu_inflight)) return -EINVAL;
    unsigned nq = m->inflight.num_queues, qs = m->inflight.queue_size;
    if (!nq || nq > VHB_MAX_QUEUES || !qs || qs > VIRTQ_MAX_SIZE)
        return vd_err(-EINVAL, "GET_INFLIGHT_FD: %u queues of %u", nq, qs);
    size_t size = nq * vhu_inflight_queue_size(qs);
    int fd = memfd_create("vdisk-inflight", MFD_CLOEXEC);
    if (fd < 0) return -errno;
    void *p = MAP_FAILED;
    if (ftruncate(fd, size) == 0)
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { int e = -errno; close(fd); return e; }
    inflight_unmap(b);
    b->inflight_map = p;
    b->inflight_size = size;
    b->inflight_qsize = qs;
    m->inflight.mmap_size = size;
    m->inflight.mmap_offset = 0;
    m->hdr.size = sizeof(struct vhu_inflight);
    *reply_fd = fd;
    return 0;
}

static int handle_set_inflight(struct vd_vhost_blk *b, struct vhu_msg *m)
{
    if (m->hdr.size < sizeof(struct vhu_inflight) || m->nfds != 1) return -EINVAL;
    unsigned nq = m->inflight.num_queues, qs = m->inflight.queue_size;
    uint64_t size = m->inflight.mmap_size, off = m->inflight.mmap_offset, end;
    struct stat st;
    if (!nq || nq > VHB_MAX_QUEUES || !qs || qs > VIRTQ_MAX_SIZE ||
        size < nq * vhu_inflight_queue_size(qs) || __builtin_add_overflow(size, off, &end) ||
        fstat(m->fds[0], &st) < 0 || (uint64_t)st.st_size < end || (off & 4095) ||
        size > (1ull << 32))
        return vd_err(-EINVAL, "SET_INFLIGHT_FD: bad region (%u queues of %u, %llu bytes)",
                      nq, qs, (unsigned long long)size);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, m->fds[0], off);
    if (p == MAP_FAILED) return -errno;
    inflight_unmap(b);
    b->inflight_map = p;
    b->inflight_size = size;
    b->inflight_qsize = nq >= b->o.num_queues ? qs : 0;   /* too few queues: no tracking */
    return 0;
}

static int handle_config(struct vd_vhost_blk *b, struct vhu_msg *m, bool set)
{
    struct virtio_blk_config c;
    uint32_t off = m->config.offset, n = m->config.size;
    if (m->hdr.size < 12 || n > VHU_CONFIG_MAX || m->hdr.size < 12 + (set ? n : 0))
        return -EINVAL;
    if (!set) {
        m->hdr.size = 12 + n;
        memset(m->config.data, 0, n);
        if (off > sizeof(c) || n > sizeof(c) - off) {
            m->hdr.size = 0;   /* an error, as the spec spells it */
            return 0;
        }
        vhb_config(b, &c);
        memcpy(m->config.data, (uint8_t *)&c + off, n);
        return 0;
    }
    /* Only the writeback byte is writable. */
    if (off == VHB_CONFIG_WRITEBACK_OFF && n == 1) {
        __atomic_store_n(&b->wce, m->config.data[0] ? 1 : 0, __ATOMIC_RELAXED);
        return 0;
    }
    return vd_err(-EPERM, "SET_CONFIG: offset %u size %u is read-only", off, n);
}

/* Answer one message. Returns 0, -errno (reported with REPLY_ACK), or
 * -EPIPE style fatal errors through *fatal. */
static int handle_msg(struct vd_vhost_blk *b, struct vhu_msg *m, bool *reply, bool *fatal,
                      int *reply_fd)
{
    struct vhb_queue *q;
    uint32_t idx;
    int rc = 0;

    *reply = false;
    switch (m->hdr.request) {
    case VHU_GET_FEATURES:
        m->u64 = offered_features(b);
        m->hdr.size = 8;
        *reply = true;
        return 0;
    case VHU_SET_FEATURES:
        if (m->hdr.size < 8) return -EINVAL;
        if (m->u64 & ~offered_features(b)) {
            *fatal = true;
            return vd_err(-EINVAL, "SET_FEATURES: 0x%llx has bits we did not offer",
                          (unsigned long long)m->u64);
        }
        if (!(m->u64 & VHU_BIT(VIRTIO_F_VERSION_1))) {
            *fatal = true;
            return vd_err(-EINVAL, "SET_FEATURES: VIRTIO_F_VERSION_1 is required");
        }
        b->features = m->u64;
        b->features_acked = true;
        update_logs(b);       /* VHOST_F_LOG_ALL turns logging on or off */
        return 0;
    case VHU_GET_PROTOCOL_FEATURES:
        m->u64 = offered_pfeatures;
        m->hdr.size = 8;
        *reply = true;
        return 0;
    case VHU_SET_PROTOCOL_FEATURES:
        if (m->hdr.size < 8) return -EINVAL;
        b->pfeatures = m->u64 & offered_pfeatures;
        return 0;
    case VHU_SET_OWNER:
        return 0;
    case VHU_RESET_OWNER:
    case VHU_RESET_DEVICE:
        device_reset(b);
        return 0;
    case VHU_GET_QUEUE_NUM:
        m->u64 = b->o.num_queues;
        m->hdr.size = 8;
        *reply = true;
        return 0;
    case VHU_GET_MAX_MEM_SLOTS:
        m->u64 = VHU_MAX_MEM_SLOTS;
        m->hdr.size = 8;
        *reply = true;
        return 0;
    case VHU_SET_MEM_TABLE:
        return handle_mem_table(b, m);
    case VHU_ADD_MEM_REG:
        return handle_add_reg(b, m);
    case VHU_REM_MEM_REG:
        return handle_rem_reg(b, m);
    case VHU_SET_VRING_NUM:
        if (m->hdr.size < 8 || !(q = msg_queue(b, m->state.index)) || q->running) return -EINVAL;
        if (m->state.num == 0 || m->state.num > VIRTQ_MAX_SIZE)
            return vd_err(-EINVAL, "SET_VRING_NUM: bad size %u", m->state.num);
        q->num = m->state.num;
        return 0;
    case VHU_SET_VRING_ADDR:
        if (m->hdr.size < sizeof(struct vhu_vring_addr) || !(q = msg_queue(b, m->addr.index)))
            return -EINVAL;
        if (q->running) {
            /* While it runs, only logging may change (QEMU turns
             * VHOST_VRING_F_LOG on and off this way during migration). */
            if (m->addr.desc != q->addr.desc || m->addr.avail != q->addr.avail ||
                m->addr.used != q->addr.used)
                return vd_err(-EBUSY, "SET_VRING_ADDR: queue %u is running", q->index);
            q->addr = m->addr;
            struct vhb_start s = { 0 };
            queue_log(b, q, &s);
            vhb_queue_set_log(q, s.log, s.log_used, s.log_used_gpa);
            return 0;
        }
        q->addr = m->addr;
        q->have_addr = true;
        return 0;
    case VHU_SET_VRING_BASE:
        if (m->hdr.size < 8 || !(q = msg_queue(b, m->state.index)) || q->running) return -EINVAL;
        q->base = m->state.num;
        return 0;
    case VHU_GET_VRING_BASE:
        if (m->hdr.size < 8 || !(q = msg_queue(b, m->state.index))) return -EINVAL;
        if (q->running) {
            q->base = vhb_queue_stop(q);
            q->running = false;
        }
        if (q->kick_fd >= 0) close(q->kick_fd);
        q->kick_fd = -1;
        m->state.num = q->base;
        m->hdr.size = sizeof(m->state);
        *reply = true;
        return 0;
    case VHU_SET_VRING_KICK:
    case VHU_SET_VRING_CALL:
    case VHU_SET_VRING_ERR: {
        if (m->hdr.size < 8) return -EINVAL;
        idx = m->u64 & VHU_VRING_IDX_MASK;
        if (!(q = msg_queue(b, idx))) return -EINVAL;
        int fd = -1;
        if (!(m->u64 & VHU_VRING_NOFD)) {
            if (m->nfds != 1) return -EINVAL;
            fd = take_fd(m, 0);
        }
        if (m->hdr.request == VHU_SET_VRING_KICK) {
            if (q->running) {     /* a new kick fd means a restart */
                q->base = vhb_queue_stop(q);
                q->running = false;
            }
            if (q->kick_fd >= 0) close(q->kick_fd);
            q->kick_fd = fd;
            if (!(b->features & VHU_BIT(VHOST_USER_F_PROTOCOL_FEATURES))) q->enabled = true;
            rc = queue_try_start(b, q);
            if (rc < 0) fprintf(stderr, "vdisk: vhost-user-blk %s: %s\n", b->path, vd_errmsg(rc));
            return rc;
        }
        if (m->hdr.request == VHU_SET_VRING_CALL) {
            int old = q->call_fd;
            if (q->running) vhb_queue_set_call(q, fd);
            else q->call_fd = fd;
            if (old >= 0) close(old);
            return 0;
        }
        {
            int old = q->err_fd;
            if (q->running) vhb_queue_set_err(q, fd);
            else q->err_fd = fd;
            if (old >= 0) close(old);
        }
        return 0;
    }
    case VHU_SET_VRING_ENABLE:
        if (m->hdr.size < 8 || !(q = msg_queue(b, m->state.index))) return -EINVAL;
        q->enabled = m->state.num != 0;
        if (q->running) vhb_queue_set_enabled(q, q->enabled);
        return 0;
    case VHU_SET_BACKEND_REQ_FD:
        if (m->nfds != 1) return -EINVAL;
        pthread_mutex_lock(&b->lock);
        if (b->backend_fd >= 0) close(b->backend_fd);
        b->backend_fd = take_fd(m, 0);
        {
            struct timeval tv = { 5, 0 };
            setsockopt(b->backend_fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        }
        pthread_mutex_unlock(&b->lock);
        return 0;
    case VHU_GET_CONFIG:
        rc = handle_config(b, m, false);
        *reply = rc == 0;
        return rc;
    case VHU_SET_CONFIG:
        return handle_config(b, m, true);
    case VHU_GET_INFLIGHT_FD:
        rc = handle_get_inflight(b, m, reply_fd);
        if (rc < 0) { m->hdr.size = sizeof(struct vhu_inflight); memset(&m->inflight, 0, sizeof(m->inflight)); }
        *reply = true;
        return rc;
    case VHU_SET_INFLIGHT_FD:
        return handle_set_inflight(b, m);
    case VHU_SET_LOG_BASE:
        /* with LOG_SHMFD the front-end waits for a reply (u64 0: done) */
        rc = handle_log_base(b, m);
        m->u64 = rc < 0 ? (uint64_t)-rc : 0;
        m->hdr.size = 8;
        *reply = true;
        return rc;
    case VHU_SET_LOG_FD:
        /* The eventfd that would tell the front-end the log changed: it
         * reads the log when it syncs anyway, so it is not used. */
        return 0;
    default:
        return vd_err(-ENOTSUP, "unknown request %u", m->hdr.request);
    }
}

/* Serve the connection until it closes or the export stops. */
static void serve(struct vd_vhost_blk *b)
{
    struct vhu_msg *m = malloc(sizeof(*m));
    if (!m) return;
    for (;;) {
        struct pollfd p[2] = { { b->conn_fd, POLLIN, 0 }, { b->stop_fd, POLLIN, 0 } };
        if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; break; }
        if (p[1].revents) break;
        int rc = vhu_msg_recv(b->conn_fd, m);
        if (rc < 0) {
            if (rc != -EPIPE && rc != -ECONNRESET)
                fprintf(stderr, "vdisk: vhost-user-blk %s: receive: %s\n", b->path, strerror(-rc));
            break;
        }
        if ((m->hdr.flags & VHU_VERSION_MASK) != VHU_VERSION) {
            fprintf(stderr, "vdisk: vhost-user-blk %s: bad message version\n", b->path);
            vhu_msg_close_fds(m);
            break;
        }
        uint32_t req = m->hdr.request, need = m->hdr.flags & VHU_FLAG_NEED_REPLY;
        bool reply = false, fatal = false;
        int reply_fd = -1;
        vd_err_clear();
        rc = handle_msg(b, m, &reply, &fatal, &reply_fd);
        vhu_msg_close_fds(m);          /* what the handler did not keep */
        if (rc < 0 && rc != -ENOTSUP)
            fprintf(stderr, "vdisk: vhost-user-blk %s: request %u: %s\n", b->path, req, vd_errmsg(rc));
        if (fatal) { if (reply_fd >= 0) close(reply_fd); break; }
        if (!reply && need && (b->pfeatures & VHU_BIT(VHU_PF_REPLY_ACK))) {
            m->u64 = rc < 0 ? (uint64_t)-rc : 0;
            m->hdr.size = 8;
            reply = true;
        }
        if (reply) {
            m->hdr.request = req;
            m->hdr.flags = VHU_VERSION | VHU_FLAG_REPLY;
            m->nfds = 0;
            if (reply_fd >= 0) m->fds[m->nfds++] = reply_fd;
            rc = vhu_msg_send(b->conn_fd, m);
            vhu_msg_close_fds(m);
            if (rc < 0) break;
        }
    }
    free(m);
}

static void *ctl_main(void *arg)
{
    struct vd_vhost_blk *b = arg;
    for (;;) {
        struct pollfd p[2] = { { b->listen_fd, POLLIN, 0 }, { b->stop_fd, POLLIN, 0 } };
        if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; break; }
        if (p[1].revents) break;
        int fd = accept4(b->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) continue;
        /* A front-end that stops in the middle of a message must not hold
         * the control thread (and so export removal) forever. */
        struct timeval tv = { 10, 0 };
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        pthread_mutex_lock(&b->lock);
        b->conn_fd = fd;
        b->connected = true;
        b->connections++;
        pthread_mutex_unlock(&b->lock);
        serve(b);
        connection_reset(b);
        pthread_mutex_lock(&b->lock);
        close(b->conn_fd);
        b->conn_fd = -1;
        pthread_mutex_unlock(&b->lock);
    }
    return NULL;
}

static void *thread_main(void *arg)
{
    struct vhb_thread *t = arg;
    struct vd_loop *loop;
    t->rc = vd_loop_new(t->aio, &loop);
    t->loop = t->rc == 0 ? loop : NULL;
    sem_post(&t->ready);
    if (t->rc) return NULL;
    vd_loop_run(loop);
    vd_loop_free(loop);
    return NULL;
}

static void stop_threads(struct vd_vhost_blk *b, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        if (b->thr[i].loop) vd_loop_stop(b->thr[i].loop);
        pthread_join(b->thr[i].tid, NULL);
        sem_destroy(&b->thr[i].ready);
    }
}

static int listen_on(const char *path)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(a.sun_path))
        return vd_err(-ENAMETOOLONG, "%s: socket path too long", path);
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return vd_err(-errno, "%s: socket: %m", path);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);   /* a stale socket */
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 4) < 0) {
        int e = -errno;
        close(fd);
        return vd_err(e, "%s: cannot listen: %s", path, strerror(-e));
    }
    return fd;
}

int vd_vhost_blk_new(struct vd_disk *d, const char *socket_path,
                     const struct vd_vhost_blk_opts *o_in, struct vd_vhost_blk **out)
{
    struct vd_vhost_blk_opts o = o_in ? *o_in : (struct vd_vhost_blk_opts){ 0 };
    if (!o.num_queues) o.num_queues = 1;
    if (o.num_queues > VHB_MAX_QUEUES)
        return vd_err(-EINVAL, "%s: num-queues %u is more than %d", socket_path, o.num_queues, VHB_MAX_QUEUES);
    if (!o.logical_block_size) o.logical_block_size = VIRTIO_BLK_SECTOR;
    if (o.logical_block_size != 512 && o.logical_block_size != 4096)
        return vd_err(-EINVAL, "%s: logical block size must be 512 or 4096", socket_path);
    if (o.serial && strlen(o.serial) > VIRTIO_BLK_ID_BYTES)
        return vd_err(-EINVAL, "%s: serial is longer than %d bytes", socket_path, VIRTIO_BLK_ID_BYTES);
    if (!o.submit_batch) o.submit_batch = VHB_SUBMIT_BATCH;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (!o.nthreads) o.nthreads = o.num_queues < (unsigned)(cpus > 0 ? cpus : 1) ? o.num_queues : (unsigned)cpus;
    if (o.nthreads > o.num_queues) o.nthreads = o.num_queues;

    struct vd_vhost_blk *b = calloc(1, sizeof(*b));
    if (!b) return -ENOMEM;
    b->disk = d;
    b->o = o;
    b->o.serial = NULL;
    if (o.serial) memcpy(b->serial, o.serial, strlen(o.serial));
    b->path = strdup(socket_path);
    b->conn_fd = b->backend_fd = -1;
    b->wce = 1;
    pthread_mutex_init(&b->lock, NULL);
    b->stop_fd = eventfd(0, EFD_CLOEXEC);
    int rc = b->path && b->stop_fd >= 0 ? 0 : -ENOMEM;
    if (!rc) rc = b->listen_fd = listen_on(socket_path);
    if (rc < 0) goto fail;
    b->thr = calloc(o.nthreads, sizeof(*b->thr));
    if (!b->thr) { rc = -ENOMEM; goto fail_listen; }
    unsigned started = 0;
    for (; started < o.nthreads; started++) {
        struct vhb_thread *t = &b->thr[started];
        t->aio = o.aio;
        sem_init(&t->ready, 0, 0);
        if (pthread_create(&t->tid, NULL, thread_main, t) != 0) { rc = -EAGAIN; break; }
        while (sem_wait(&t->ready) < 0 && errno == EINTR) {}
        if (t->rc) { rc = t->rc; started++; break; }
    }
    if (rc < 0) { stop_threads(b, started); goto fail_listen; }
    b->nthreads = o.nthreads;
    for (unsigned i = 0; i < o.num_queues; i++) {
        struct vhb_queue *q = &b->q[i];
        q->b = b;
        q->index = i;
        q->loop = b->thr[i % o.nthreads].loop;
        q->kick_fd = q->call_fd = q->err_fd = -1;
    }
    if (pthread_create(&b->ctl, NULL, ctl_main, b) != 0) {
        rc = -EAGAIN;
        stop_threads(b, b->nthreads);
        goto fail_listen;
    }
    *out = b;
    return 0;
fail_listen:
    if (b->listen_fd >= 0) { close(b->listen_fd); unlink(socket_path); }
fail:
    if (b->stop_fd >= 0) close(b->stop_fd);
    free(b->thr);
    free(b->path);
    pthread_mutex_destroy(&b->lock);
    free(b);
    return rc;
}

void vd_vhost_blk_free(struct vd_vhost_blk *b)
{
    if (!b) return;
    eventfd_write(b->stop_fd, 1);
    pthread_join(b->ctl, NULL);    /* drops the front-end, draining its queues */
    stop_threads(b, b->nthreads);
    close(b->listen_fd);
    unlink(b->path);
    close(b->stop_fd);
    pthread_mutex_destroy(&b->lock);
    free(b->thr);
    free(b->path);
    free(b);
}

int vd_vhost_blk_resized(struct vd_vhost_blk *b)
{
    int rc = 0;
    pthread_mutex_lock(&b->lock);
    if (b->backend_fd >= 0 && (b->pfeatures & VHU_BIT(VHU_PF_BACKEND_REQ))) {
        struct vhu_msg m = { .hdr = { VHU_BACKEND_CONFIG_CHANGE_MSG, VHU_VERSION, 0 } };
        rc = vhu_msg_send(b->backend_fd, &m);
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

void vd_vhost_blk_get_stats(struct vd_vhost_blk *b, struct vd_vhost_blk_stats *st)
{
    memset(st, 0, sizeof(*st));
    for (unsigned i = 0; i < b->o.num_queues; i++) {
        struct vhb_queue *q = &b->q[i];
#define S(dst, f) st->dst += __atomic_load_n(&q->f, __ATOMIC_RELAXED)
        S(requests, st_requests); S(reads, st_reads); S(writes, st_writes);
        S(flushes, st_flushes); S(discards, st_discards); S(write_zeroes, st_wz);
        S(errors, st_errors); S(bytes_read, st_bytes_read); S(bytes_written, st_bytes_written);
        S(queue_requests[i], st_requests);
#undef S
    }
    st->num_queues = b->o.num_queues;
    pthread_mutex_lock(&b->lock);
    st->connections = b->connections;
    st->connected = b->connected;
    pthread_mutex_unlock(&b->lock);
}

const char *vd_vhost_blk_socket(const struct vd_vhost_blk *b)
{
    return b->path;
}
