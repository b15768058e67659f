/* Split virtqueue, device side. The guest may change any ring byte at any
 * time, so each guest field is read once into a local before it is
 * checked and used. x86 keeps loads ordered and stores ordered; the only
 * fences needed are store->load ones (publishing used->idx or avail_event,
 * then reading what the driver asked for). */
#include <errno.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#include "vmm-glue/virtq.h"

#define LOAD16(p)  __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE16(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static inline uint16_t *used_event(struct virtq *q) { return &q->avail->ring[q->num]; }
static inline uint16_t *avail_event(struct virtq *q) { return (uint16_t *)&q->used->ring[q->num]; }

int virtq_init(struct virtq *q, unsigned num, void *desc, void *avail, void *used,
               const struct vhu_mtab *mt, bool event_idx, uint16_t last_avail)
{
    if (num == 0 || num > VIRTQ_MAX_SIZE) return -EINVAL;
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3)) return -EINVAL;
    memset(q, 0, sizeof(*q));
    q->num = num;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->mt = mt;
    q->event_idx = event_idx;
    q->last_avail = last_avail;
    q->used_idx = LOAD16(&q->used->idx);
    return 0;
}

void virtq_inflight_mark(struct virtq *q, uint16_t head)
{
    struct vhu_inflight_queue *r = q->inflight;
    if (!r) return;
    r->desc[head].counter = q->inflight_counter++;
    __atomic_store_n(&r->desc[head].inflight, 1, __ATOMIC_RELEASE);
}

int virtq_pop(struct virtq *q, uint16_t *head)
{
    if (q->broken) return -EIO;
    uint16_t avail = LOAD16(&q->avail->idx);
    uint16_t pending = (uint16_t)(avail - q->last_avail);
    if (pending == 0) return 0;
    if (pending > q->num) { q->broken = true; return -EIO; }
    uint16_t h = LOAD16(&q->avail->ring[q->last_avail % q->num]);
    if (h >= q->num) { q->broken = true; return -EIO; }
    q->last_avail++;
    virtq_inflight_mark(q, h);
    *head = h;
    return 1;
}

static int add_seg(struct virtq_chain *c, const struct vhu_mtab *mt, uint64_t addr,
                   uint32_t len, bool writable)
{
    if (!writable && c->niov > c->nout) return -EIO;  /* readable after writable */
    while (len) {
        uint64_t avail;
        void *p = vhu_gpa_part(mt, addr, len, &avail);
        if (!p) return -EIO;
        if (c->niov == c->cap) return -EIO;
        c->iov[c->niov].iov_base = p;
        c->iov[c->niov].iov_len = avail;
        c->niov++;
        if (writable) c->in_len += avail;
        else { c->out_len += avail; c->nout = c->niov; }
        addr += avail;
        len -= avail;
    }
    return 0;
}

int virtq_map_chain(const struct virtq *q, uint16_t head, struct virtq_chain *c)
{
    const struct virtq_desc *table = q->desc;
    unsigned max = q->num, count = 0, idx = head;
    bool indirect = false, fault = false;

    c->niov = c->nout = 0;
    c->out_len = c->in_len = 0;
    c->status = NULL;
    for (;;) {
        if (idx >= max || ++count > max) return -EIO;   /* out of table, or a loop */
        const volatile struct virtq_desc *vd = &table[idx];
        struct virtq_desc d = { vd->addr, vd->len, vd->flags, vd->next };
        if (d.flags & VIRTQ_DESC_F_INDIRECT) {
            if (indirect || (d.flags & VIRTQ_DESC_F_NEXT)) return -EIO;
            if (d.len == 0 || d.len % sizeof(struct virtq_desc) ||
                d.len / sizeof(struct virtq_desc) > VIRTQ_MAX_SIZE) return -EIO;
            table = vhu_gpa(q->mt, d.addr, d.len);
            if (!table || ((uintptr_t)table & 7)) return -EIO;
            max = d.len / sizeof(struct virtq_desc);
            idx = 0;
            count = 0;
            indirect = true;
            continue;
        }
        /* After a bad buffer, keep walking (bounded as above) only to find
         * the last descriptor: the status byte the driver waits on. */
        if (!fault && d.len && add_seg(c, q->mt, d.addr, d.len, d.flags & VIRTQ_DESC_F_WRITE) < 0)
            fault = true;
        if (!(d.flags & VIRTQ_DESC_F_NEXT)) {
            if (!fault) return 0;
            if ((d.flags & VIRTQ_DESC_F_WRITE) && d.len)
                c->status = vhu_gpa(q->mt, d.addr + d.len - 1, 1);
            return -EIO;
        }
        idx = d.next;
    }
}

void virtq_push(struct virtq *q, uint16_t head, uint32_t len)
{
    struct vhu_inflight_queue *r = q->inflight;
    if (r) {
        r->desc[head].next = r->last_batch_head;
        r->last_batch_head = head;
    }
    unsigned slot = q->used_idx % q->num;
    struct virtq_used_elem *e = &q->used->ring[slot];
    e->id = head;
    e->len = len;
    q->used_idx++;
    bool log = q->log && q->log_used;
    if (log)        /* the element is marked before the index publishes it */
        vhu_log_mark(q->log, q->log_used_gpa + offsetof(struct virtq_used, ring) + 8ull * slot, 8);
    STORE16(&q->used->idx, q->used_idx);
    if (log)
        vhu_log_mark(q->log, q->log_used_gpa + offsetof(struct virtq_used, idx), 2);
    if (r) {
        __atomic_store_n(&r->desc[head].inflight, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&r->used_idx, q->used_idx, __ATOMIC_RELEASE);
    }
}

bool virtq_should_notify(struct virtq *q)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!q->event_idx)
        return !(LOAD16(&q->avail->flags) & VIRTQ_AVAIL_F_NO_INTERRUPT);
    uint16_t old = q->signalled_used, new = q->used_idx;
    bool valid = q->signalled_used_valid;
    q->signalled_used = new;
    q->signalled_used_valid = true;
    if (!valid) return true;
    uint16_t ev = LOAD16(used_event(q));
    /* notify when used_event lies in (old, new] */
    return (uint16_t)(new - ev - 1) < (uint16_t)(new - old);
}

bool virtq_restart_should_notify(struct virtq *q)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t used = LOAD16(&q->used->idx);
    if (!q->event_idx)
        return !(LOAD16(&q->avail->flags) & VIRTQ_AVAIL_F_NO_INTERRUPT);
    /* The driver asked to be told when entry used_event is returned; it
     * set used_event no further back than the entries it has taken (at
     * most num behind). An entry at or past it already in the ring: due. */
    uint16_t ev = LOAD16(used_event(q));
    return (uint16_t)(used - ev - 1) < q->num;
}

bool virtq_arm(struct virtq *q)
{
    if (q->broken) return false;
    if (q->event_idx) {
        STORE16(avail_event(q), q->last_avail);
        if (q->log && q->log_used)      /* avail_event is in the used ring too */
            vhu_log_mark(q->log, q->log_used_gpa + offsetof(struct virtq_used, ring) + 8ull * q->num, 2);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return LOAD16(&q->avail->idx) != q->last_avail;
}

static int cmp_counter(const void *a, const void *b, void *arg)
{
    const struct vhu_inflight_queue *r = arg;
    uint64_t x = r->desc[*(const uint16_t *)a].counter, y = r->desc[*(const uint16_t *)b].counter;
    return x < y ? -1 : x > y;
}

int virtq_inflight_attach(struct virtq *q, struct vhu_inflight_queue *r, uint64_t features,
                          uint16_t *heads, unsigned max)
{
    q->inflight = r;
    q->inflight_counter = 0;
    if (!r) return 0;
    uint16_t used = LOAD16(&q->used->idx);
    if (r->version != 1 || r->desc_num != q->num) {
        /* first use (or a region of another shape): start clean */
        memset(r->desc, 0, q->num * sizeof(r->desc[0]));
        r->features = features;
        r->desc_num = q->num;
        r->last_batch_head = 0;
        r->used_idx = used;
        __atomic_store_n(&r->version, 1, __ATOMIC_RELEASE);
        return 0;
    }
    /* A previous process died between publishing used->idx and clearing
     * the inflight flags of that batch: clear them now. */
    if (r->used_idx != used) {
        uint16_t batch = (uint16_t)(used - r->used_idx), h = r->last_batch_head;
        if (batch > q->num) batch = q->num;
        for (unsigned i = 0; i < batch && h < q->num; i++) {
            r->desc[h].inflight = 0;
            h = r->desc[h].next;
        }
        r->used_idx = used;
    }
    unsigned n = 0;
    uint64_t maxc = 0;
    for (unsigned i = 0; i < q->num; i++) {
        if (!r->desc[i].inflight) continue;
        if (r->desc[i].inflight != 1 || n == max) return -EIO;
        heads[n++] = i;
        if (r->desc[i].counter >= maxc) maxc = r->desc[i].counter + 1;
    }
    qsort_r(heads, n, sizeof(heads[0]), cmp_counter, r);
    q->inflight_counter = maxc;
    q->used_idx = used;
    /* every chain taken was either returned (used) or is in flight */
    q->last_avail = (uint16_t)(used + n);
    return n;
}

uint64_t virtq_iov_copy_from(const struct iovec *iov, unsigned n, uint64_t off, void *buf, uint64_t len)
{
    uint64_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        if (off >= iov[i].iov_len) { off -= iov[i].iov_len; continue; }
        uint64_t k = iov[i].iov_len - off;
        if (k > len - done) k = len - done;
        memcpy((char *)buf + done, (char *)iov[i].iov_base + off, k);
        done += k;
        off = 0;
    }
    return done;
}

uint64_t virtq_iov_copy_to(const struct iovec *iov, unsigned n, uint64_t off, const void *buf, uint64_t len)
{
    uint64_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        if (off >= iov[i].iov_len) { off -= iov[i].iov_len; continue; }
        uint64_t k = iov[i].iov_len - off;
        if (k > len - done) k = len - done;
        memcpy((char *)iov[i].iov_base + off, (const char *)buf + done, k);
        done += k;
        off = 0;
    }
    return done;
}

int virtq_iov_slice(const struct iovec *iov, unsigned n, uint64_t off, uint64_t len,
                    struct iovec *dst, unsigned cap)
{
    unsigned k = 0;
    for (unsigned i = 0; i < n && len; i++) {
        if (off >= iov[i].iov_len) { off -= iov[i].iov_len; continue; }
        uint64_t m = iov[i].iov_len - off;
        if (m > len) m = len;
        if (k == cap) return -1;
        dst[k].iov_base = (char *)iov[i].iov_base + off;
        dst[k].iov_len = m;
        k++;
        len -= m;
        off = 0;
    }
    return len ? -1 : (int)k;
}
