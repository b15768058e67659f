/* The asynchronous data path. A request is split along the top layer's map:
 * data ranges become host I/O on the thread's loop, zero ranges are filled
 * in memory, unallocated ranges go to the layer below, compressed units are
 * decompressed by the driver. Writes to ranges that are not yet data get a
 * place from the driver (alloc), the data is written (with copy-on-write of
 * the rest of the unit), then the driver links it (commit).
 *
 * Every request holds one reference for its issuer plus one per sub-op in
 * flight (r->pending); the last one out completes the request. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "disk_internal.h"

#define INLINE_IOV 4

struct subio {
    struct vd_io io;
    struct vd_req *r;
    struct vd_layer *l;         /* allocating write: the layer to commit in */
    struct vd_alloc a;
    bool has_alloc;
    void *bounce;               /* freed when done */
    struct iovec inl[INLINE_IOV];
};

/* A write that waits for an allocation in flight in the same unit. */
struct waiter {
    struct vd_req *r;
    struct vd_layer *l;
    uint64_t off, len;
    size_t pos;                 /* offset of off in the request's buffers */
    struct waiter *next;
};

static void write_range(struct vd_req *r, struct vd_layer *l, uint64_t off, uint64_t len, size_t pos);
static void flush_start(struct vd_req *r);
static void submit(struct vd_disk *d, struct vd_req *r, bool gate);
static void gate_leave(struct vd_disk *d);
static bool gate_enter(struct vd_disk *d, struct vd_req *r, int kind);
static void meta_start(struct vd_req *r, int kind);
static int status_plan(struct vd_req *r);
static int resize_run(struct vd_req *r);

/* core-private bit of r->flags: the request is counted in its disk's gate */
#define REQ_F_GATED 0x80000000u

/* Planning on a worker (gated disks, below): the job whose host I/O the
 * loop submits when it is done. */
struct plan;
static __thread struct plan *tl_plan;
static void plan_defer(struct plan *p, struct vd_io *io);
enum plan_kind { PLAN_READ, PLAN_WRITE, PLAN_RANGE, PLAN_COMMIT, PLAN_STATUS };
struct subio;
struct waiter;
static void plan_start(struct vd_req *r, enum plan_kind kind, struct waiter *w, struct subio *s, int res);

/* ---- references ----
 * Atomic: on a gated disk (below) a worker plans a request while its loop
 * may finish parts of it that are already in flight. */

static void ref_get(struct vd_req *r)
{
    __atomic_add_fetch(&r->pending, 1, __ATOMIC_RELAXED);
}

static void set_err(struct vd_req *r, int err)
{
    int zero = 0;
    if (err < 0)
        __atomic_compare_exchange_n(&r->err, &zero, err, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static void req_finish(struct vd_req *r)
{
    struct vd_disk *d = r->disk;
    bool gated = r->flags & REQ_F_GATED;
    if (r->err == 0 && r->op != VD_OP_FLUSH && (r->flags & VD_REQ_FUA) &&
        !d->readonly) {
        r->flags &= ~VD_REQ_FUA;     /* FUA: a flush after the write, once */
        r->pending = 1;
        if (gated && d->top->fmt->flush) {
            /* the format's flush is a metadata op: through the gate again */
            r->flags &= ~REQ_F_GATED;
            gate_leave(d);
            if (gate_enter(d, r, VD_OP_FLUSH))
                meta_start(r, VD_OP_FLUSH);
            return;
        }
        flush_start(r);
        return;
    }
    if (gated) {
        r->flags &= ~REQ_F_GATED;
        gate_leave(d);
    }
    r->done(r, r->err);
}

static void req_put(struct vd_req *r, int err)
{
    set_err(r, err);
    if (__atomic_sub_fetch(&r->pending, 1, __ATOMIC_ACQ_REL) == 0)
        req_finish(r);
}

/* ---- buffers ---- */

/* The iovec entries covering [pos, pos+len) of the request's buffers. */
static int iov_slice(const struct vd_req *r, size_t pos, size_t len,
                     struct iovec *inl, struct iovec **out)
{
    int i = 0, n = 0;
    while (i < r->iovcnt && pos >= r->iov[i].iov_len) {
        pos -= r->iov[i].iov_len;
        i++;
    }
    int first = i;
    size_t left = len + pos;
    while (i < r->iovcnt && left > 0) {
        left -= left < r->iov[i].iov_len ? left : r->iov[i].iov_len;
        i++;
        n++;
    }
    struct iovec *v = n <= INLINE_IOV ? inl : malloc(sizeof(*v) * (size_t)n);
    if (!v)
        return -ENOMEM;
    size_t want = len;
    for (int k = 0; k < n; k++) {
        const struct iovec *src = &r->iov[first + k];
        size_t skip = k == 0 ? pos : 0;
        size_t take = src->iov_len - skip;
        if (take > want)
            take = want;
        v[k].iov_base = (char *)src->iov_base + skip;
        v[k].iov_len = take;
        want -= take;
    }
    *out = v;
    return n;
}

/* Bytes [pos, pos + len) of r's buffer: copied out to out, copied in from
 * in, or zeroed when both are NULL. */
static void buf_op(const struct vd_req *r, size_t pos, size_t len, void *out, const void *in)
{
    int i = 0;
    char *dst = out;
    const char *src = in;
    while (i < r->iovcnt && pos >= r->iov[i].iov_len) {
        pos -= r->iov[i].iov_len;
        i++;
    }
    for (; i < r->iovcnt && len; i++) {
        size_t take = r->iov[i].iov_len - pos;
        if (take > len)
            take = len;
        char *p = (char *)r->iov[i].iov_base + pos;
        if (dst) {
            memcpy(dst, p, take);
            dst += take;
        } else if (src) {
            memcpy(p, src, take);
            src += take;
        } else {
            memset(p, 0, take);
        }
        len -= take;
        pos = 0;
    }
}

static void buf_zero(const struct vd_req *r, size_t pos, size_t len) { buf_op(r, pos, len, NULL, NULL); }
static void buf_copy_out(const struct vd_req *r, size_t pos, size_t len, void *dst) { buf_op(r, pos, len, dst, NULL); }
static void buf_copy_in(const struct vd_req *r, size_t pos, size_t len, const void *src) { buf_op(r, pos, len, NULL, src); }

/* ---- host I/O ---- */

static void subio_free(struct subio *s)
{
    if (s->io.iov && s->io.iov != s->inl)
        free(s->io.iov);
    free(s->bounce);
    free(s);
}

static bool io_aligned(const struct vd_io *io)
{
    uint64_t a = io->file->align;
    if (a <= 1)
        return true;
    if (io->off % a)
        return false;
    for (int i = 0; i < io->iovcnt; i++)
        if ((uintptr_t)io->iov[i].iov_base % a || io->iov[i].iov_len % a)
            return false;
    return true;
}

/* Direct files need aligned buffers; the rare unaligned request is done
 * synchronously through the file's bounce buffers. */
static void submit_host(struct vd_req *r, struct subio *s)
{
    struct vd_io *io = &s->io;
    if (tl_plan) {          /* planning on a worker: the loop submits it */
        plan_defer(tl_plan, io);
        return;
    }
    if ((io->op != VD_IO_READ && io->op != VD_IO_WRITE) || io_aligned(io)) {
        vd_loop_submit_io(r->loop, io);
        return;
    }
    int res = 0;
    uint64_t off = io->off;
    for (int i = 0; i < io->iovcnt && res == 0; i++) {
        res = io->op == VD_IO_READ
            ? vd_file_pread(io->file, io->iov[i].iov_base, io->iov[i].iov_len, off)
            : vd_file_pwrite(io->file, io->iov[i].iov_base, io->iov[i].iov_len, off);
        off += io->iov[i].iov_len;
    }
    io->done(io, res);
}

static void read_done(struct vd_io *io, int res)
{
    struct subio *s = (struct subio *)io;
    struct vd_req *r = s->r;
    if (res < 0)
        vd_err(res, "%s: read at offset %llu failed: %s", io->file->name,
               (unsigned long long)io->off, vd_errmsg(res));
    subio_free(s);
    req_put(r, res);
}

static struct subio *subio_new(struct vd_req *r, enum vd_io_op op, struct vd_file *f,
                               uint64_t host_off, void (*done)(struct vd_io *, int))
{
    struct subio *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->r = r;
    s->io.op = op;
    s->io.file = f;
    s->io.off = host_off;
    s->io.done = done;
    s->io.opaque = s;
    return s;
}

static int submit_slice(struct vd_req *r, enum vd_io_op op, struct vd_file *f, uint64_t host_off,
                        size_t pos, size_t len, void (*done)(struct vd_io *, int))
{
    struct subio *s = subio_new(r, op, f, host_off, done);
    if (!s)
        return -ENOMEM;
    int n = iov_slice(r, pos, len, s->inl, &s->io.iov);
    if (n < 0) {
        free(s);
        return n;
    }
    s->io.iovcnt = n;
    ref_get(r);
    submit_host(r, s);
    return 0;
}

/* ---- reads ---- */

static int read_compressed(struct vd_req *r, struct vd_layer *l, uint64_t off, uint64_t n,
                           size_t pos, const struct vd_map *m)
{
    if (!l->fmt->read_compressed || !m->comp_unit)
        return vd_err(-EIO, "%s: compressed data at offset %llu but no decompressor",
                      l->filename, (unsigned long long)off);
    void *buf = malloc(m->comp_unit);
    if (!buf)
        return -ENOMEM;
    pthread_mutex_lock(&l->lock);
    int ret = l->fmt->read_compressed(l, m, buf);
    pthread_mutex_unlock(&l->lock);
    if (ret == 0) {
        uint64_t skip = off - m->comp_voff;
        if (skip + n > m->comp_unit)
            ret = vd_err(-EIO, "%s: compressed unit at %llu is shorter than its mapping",
                         l->filename, (unsigned long long)m->comp_voff);
        else
            buf_copy_in(r, pos, (size_t)n, (char *)buf + skip);
    }
    free(buf);
    return ret;
}

/* Issue the reads for [off, off+len) of layer l into the request buffers at pos. */
static int read_range(struct vd_req *r, struct vd_layer *l, uint64_t off, uint64_t len, size_t pos)
{
    while (len) {
        if (off >= l->size) {            /* past a shorter backing file */
            buf_zero(r, pos, (size_t)len);
            return 0;
        }
        uint64_t want = len < l->size - off ? len : l->size - off;
        struct vd_map m = {0};
        pthread_mutex_lock(&l->lock);
        int ret = l->fmt->map(l, off, want, 0, &m);
        pthread_mutex_unlock(&l->lock);
        if (ret < 0)
            return ret;
        uint64_t n = m.len < want ? m.len : want;
        if (n == 0)
            return vd_err(-EIO, "%s: format mapped no bytes at offset %llu", l->filename,
                          (unsigned long long)off);
        switch (m.kind) {
        case VD_MAP_DATA:
            ret = submit_slice(r, VD_IO_READ, m.file, m.host_off, pos, (size_t)n, read_done);
            break;
        case VD_MAP_ZERO:
            buf_zero(r, pos, (size_t)n);
            break;
        case VD_MAP_UNALLOC:
            if (l->backing)
                ret = read_range(r, l->backing, off, n, pos);
            else
                buf_zero(r, pos, (size_t)n);
            break;
        case VD_MAP_COMPRESSED:
            ret = read_compressed(r, l, off, n, pos, &m);
            break;
        }
        if (ret < 0)
            return ret;
        off += n;
        len -= n;
        pos += (size_t)n;
    }
    return 0;
}

/* ---- allocating writes ---- */

static struct vd_inflight *inflight_find(struct vd_layer *l, uint64_t start, uint64_t end)
{
    for (struct vd_inflight *f = l->inflight; f; f = f->next)
        if (f->start < end && start < f->end)
            return f;
    return NULL;
}

static void waiter_run(void *opaque)
{
    struct waiter *w = opaque;
    struct vd_req *r = w->r;
    if (r->disk->gated) {
        plan_start(r, PLAN_RANGE, w, NULL, 0);
        return;
    }
    write_range(r, w->l, w->off, w->len, w->pos);
    free(w);
    req_put(r, 0);       /* the reference the waiter held */
}

/* Unlink a's in-flight record and wake the writes that waited on it. */
static void inflight_end(struct vd_layer *l, uint64_t start)
{
    struct waiter *ws = NULL;
    for (struct vd_inflight **p = &l->inflight; *p; p = &(*p)->next)
        if ((*p)->start == start) {
            struct vd_inflight *f = *p;
            *p = f->next;
            ws = f->waiters;
            free(f);
            break;
        }
    while (ws) {
        struct waiter *next = ws->next;
        vd_loop_post(ws->r->loop, waiter_run, ws);
        ws = next;
    }
}

static void unit_span(const struct vd_layer *l, uint64_t off, uint64_t len, uint64_t *s, uint64_t *e)
{
    uint64_t u = l->alloc_unit ? l->alloc_unit : 1;
    *s = off / u * u;
    *e = (off + len + u - 1) / u * u;
}

/* Link (or undo) an allocation whose data write ended with res. */
static int alloc_commit(struct subio *s, int res)
{
    struct vd_layer *l = s->l;
    uint64_t us, ue;
    unit_span(l, s->a.fill_off, s->a.fill_len, &us, &ue);
    pthread_mutex_lock(&l->lock);
    int c = l->fmt->commit ? l->fmt->commit(l, &s->a, res) : 0;
    inflight_end(l, us);
    pthread_mutex_unlock(&l->lock);
    return res == 0 ? c : res;
}

static void alloc_write_done(struct vd_io *io, int res)
{
    struct subio *s = (struct subio *)io;
    struct vd_req *r = s->r;
    if (r->disk->gated && !tl_plan) {
        plan_start(r, PLAN_COMMIT, NULL, s, res);
        return;
    }
    res = alloc_commit(s, res);
    subio_free(s);
    req_put(r, res);
}

static void write_done(struct vd_io *io, int res)
{
    struct subio *s = (struct subio *)io;
    struct vd_req *r = s->r;
    subio_free(s);
    req_put(r, res);
}

/* Write the data of [a->off, a->off+a->len) into its new place, with the
 * rest of the fill span copied from what the layer reads there now. */
static int alloc_write(struct vd_req *r, struct vd_layer *l, const struct vd_alloc *a, size_t pos)
{
    struct subio *s = subio_new(r, VD_IO_WRITE, a->file, a->host_off, alloc_write_done);
    if (!s)
        return -ENOMEM;
    s->l = l;
    s->a = *a;
    s->has_alloc = true;
    uint64_t head = a->off - a->fill_off;
    uint64_t tail = a->fill_off + a->fill_len - (a->off + a->len);
    int ret = 0;
    if (head == 0 && tail == 0) {
        int n = iov_slice(r, pos, (size_t)a->len, s->inl, &s->io.iov);
        if (n < 0) {
            free(s);
            return n;
        }
        s->io.iovcnt = n;
    } else {
        char *b = vd_alloc_aligned((size_t)a->fill_len);
        if (!b) {
            free(s);
            return -ENOMEM;
        }
        s->bounce = b;
        if (head)
            ret = vd_layer_pread(l, b, (size_t)head, a->fill_off);
        if (ret == 0 && tail)
            ret = vd_layer_pread(l, b + head + a->len, (size_t)tail, a->off + a->len);
        buf_copy_out(r, pos, (size_t)a->len, b + head);
        s->inl[0].iov_base = b;
        s->inl[0].iov_len = (size_t)a->fill_len;
        s->io.iov = s->inl;
        s->io.iovcnt = 1;
        /* A fresh place already reads as zeros: skip writing zero fill. */
        if (ret == 0 && a->fresh && vd_buf_is_zero(b, (size_t)head) &&
            vd_buf_is_zero(b + head + a->len, (size_t)tail)) {
            s->inl[0].iov_base = b + head;
            s->inl[0].iov_len = (size_t)a->len;
            s->io.off = a->host_off + head;
        }
    }
    ref_get(r);
    if (ret < 0) {
        alloc_write_done(&s->io, ret);
        return 0;
    }
    submit_host(r, s);
    return 0;
}

/* Issue the writes for [off, off+len) of layer l from the request buffers at pos. */
static void write_range(struct vd_req *r, struct vd_layer *l, uint64_t off, uint64_t len, size_t pos)
{
    int ret = 0;
    while (len && ret == 0) {
        struct vd_map m = {0};
        pthread_mutex_lock(&l->lock);
        ret = l->fmt->map(l, off, len, VD_MAP_F_WRITE, &m);
        if (ret < 0) {
            pthread_mutex_unlock(&l->lock);
            break;
        }
        uint64_t n = m.len < len ? m.len : len;
        if (m.kind == VD_MAP_DATA && n) {
            pthread_mutex_unlock(&l->lock);
            ret = submit_slice(r, VD_IO_WRITE, m.file, m.host_off, pos, (size_t)n, write_done);
        } else if (!l->fmt->alloc) {
            pthread_mutex_unlock(&l->lock);
            ret = vd_err(-EIO, "%s: offset %llu is not writable in this image", l->filename,
                         (unsigned long long)off);
            break;
        } else {
            uint64_t us, ue;
            unit_span(l, off, n ? n : len, &us, &ue);
            struct vd_inflight *busy = inflight_find(l, us, ue);
            if (busy) {             /* wait for it, then carry on from here */
                struct waiter *w = malloc(sizeof(*w));
                if (!w) {
                    pthread_mutex_unlock(&l->lock);
                    ret = -ENOMEM;
                    break;
                }
                *w = (struct waiter){ .r = r, .l = l, .off = off, .len = len, .pos = pos,
                                      .next = busy->waiters };
                busy->waiters = w;
                ref_get(r);
                pthread_mutex_unlock(&l->lock);
                return;
            }
            struct vd_alloc a = {0};
            ret = l->fmt->alloc(l, off, len, &a);
            if (ret == 0 && (a.off != off || a.len == 0 || a.len > len || a.fill_off > a.off ||
                             a.fill_off + a.fill_len < a.off + a.len))
                ret = vd_err(-EIO, "%s: bad allocation for offset %llu", l->filename,
                             (unsigned long long)off);
            if (ret < 0) {
                pthread_mutex_unlock(&l->lock);
                break;
            }
            struct vd_inflight *f = calloc(1, sizeof(*f));
            if (!f) {
                if (l->fmt->commit)
                    l->fmt->commit(l, &a, -ENOMEM);
                pthread_mutex_unlock(&l->lock);
                ret = -ENOMEM;
                break;
            }
            unit_span(l, a.fill_off, a.fill_len, &f->start, &f->end);
            f->next = l->inflight;
            l->inflight = f;
            pthread_mutex_unlock(&l->lock);
            ret = alloc_write(r, l, &a, pos);
            n = a.len;
        }
        off += n;
        len -= n;
        pos += (size_t)n;
    }
    set_err(r, ret);
}

/* ---- flush, discard, zeroes ---- */

static void sync_done(struct vd_io *io, int res)
{
    struct subio *s = (struct subio *)io;
    struct vd_req *r = s->r;
    if (res < 0)
        vd_err(res, "%s: flush failed: %s", io->file->name, vd_errmsg(res));
    subio_free(s);
    req_put(r, res);
}

/* Write the top layer's metadata out, then sync its file on the engine. */
static void flush_start(struct vd_req *r)
{
    struct vd_layer *l = r->disk->top;
    int ret = 0;
    if (l->fmt->flush) {
        pthread_mutex_lock(&l->lock);
        ret = l->fmt->flush(l);
        pthread_mutex_unlock(&l->lock);
    }
    if (ret == 0) {
        struct subio *s = subio_new(r, VD_IO_SYNC, l->file, 0, sync_done);
        if (!s)
            ret = -ENOMEM;
        else {
            ref_get(r);
            submit_host(r, s);
        }
    }
    req_put(r, ret);
}

struct zero_state {
    struct vd_req sub;
    struct vd_req *parent;
    uint64_t off, end;
    struct iovec iov;
    bool issuing, completed_inline;
    int res;
};

#define ZERO_CHUNK (1u << 20)
static const char zero_buf[ZERO_CHUNK] __attribute__((aligned(4096)));

static void zero_next(struct vd_req *sub, int res);

/* Zeros written chunk by chunk, so a huge range needs no huge buffer. A
 * chunk that completes inside vd_disk_submit is picked up by the loop here
 * rather than by recursion. */
static void zero_issue(struct zero_state *z)
{
    z->issuing = true;
    for (;;) {
        uint64_t n = z->end - z->off < ZERO_CHUNK ? z->end - z->off : ZERO_CHUNK;
        z->iov.iov_base = (void *)zero_buf;
        z->iov.iov_len = (size_t)n;
        z->sub = (struct vd_req){ .op = VD_OP_WRITE, .off = z->off, .len = n, .iov = &z->iov,
                                  .iovcnt = 1, .done = zero_next, .opaque = z };
        z->off += n;
        z->completed_inline = false;
        /* part of a request already admitted: not through the gate again */
        submit(z->parent->disk, &z->sub, false);
        if (!z->completed_inline)
            break;              /* zero_next continues when it completes */
        if (z->res < 0 || z->off >= z->end) {
            struct vd_req *r = z->parent;
            int res = z->res;
            free(z);
            req_put(r, res);
            return;
        }
    }
    z->issuing = false;
}

static void zero_next(struct vd_req *sub, int res)
{
    struct zero_state *z = sub->opaque;
    z->res = res;
    if (z->issuing) {
        z->completed_inline = true;
        return;
    }
    if (res == 0 && z->off < z->end) {
        zero_issue(z);
        return;
    }
    struct vd_req *r = z->parent;
    free(z);
    req_put(r, res);
}

/* A format that maps every offset to itself (raw) on a backend that
 * zeroes asynchronously (RBD): discard and write-zeroes become host I/O on
 * the loop like reads and writes, instead of a synchronous call that would
 * hold the loop, and every export on it, for a cluster round trip. */
static bool zero_async(const struct vd_layer *l)
{
    return l->fmt->identity_map && l->file && l->file->proto &&
           l->file->proto->submit && l->file->proto->submit_zero;
}

static void zeroes_fallback(struct vd_req *r);

static void zero_host_done(struct vd_io *io, int res)
{
    struct subio *s = (struct subio *)io;
    struct vd_req *r = s->r;
    bool zeroes = r->op == VD_OP_WRITE_ZEROES;
    subio_free(s);
    if (res == -ENOTSUP && !zeroes)
        res = 0;                    /* discard is advisory */
    else if (res == -ENOTSUP && !(r->flags & VD_REQ_FAST_ZERO)) {
        zeroes_fallback(r);         /* write zeros instead */
        res = 0;
    }
    req_put(r, res);
}

static int zero_host(struct vd_req *r, struct vd_layer *l, enum vd_io_op op)
{
    struct subio *s = subio_new(r, op, l->file, r->off, zero_host_done);
    if (!s)
        return -ENOMEM;
    s->io.len = r->len;
    ref_get(r);
    submit_host(r, s);
    return 0;
}

static void zeroes_fallback(struct vd_req *r)
{
    struct zero_state *z = calloc(1, sizeof(*z));
    if (!z) {
        set_err(r, -ENOMEM);
        return;
    }
    z->parent = r;
    z->off = r->off;
    z->end = r->off + r->len;
    ref_get(r);
    zero_issue(z);
}

static int zeroes_start(struct vd_req *r)
{
    struct vd_layer *l = r->disk->top;
    int ret = -ENOTSUP;
    if (zero_async(l))
        return zero_host(r, l, (r->flags & VD_REQ_MAY_UNMAP) ? VD_IO_PUNCH : VD_IO_ZERO);
    if (l->fmt->zero) {
        pthread_mutex_lock(&l->lock);
        ret = l->fmt->zero(l, r->off, r->len, r->flags & (VD_REQ_MAY_UNMAP | VD_REQ_FAST_ZERO));
        pthread_mutex_unlock(&l->lock);
    }
    if (ret != -ENOTSUP)
        return ret;
    if (r->flags & VD_REQ_FAST_ZERO)
        return -ENOTSUP;
    zeroes_fallback(r);
    return 0;
}

static int discard_start(struct vd_req *r)
{
    struct vd_layer *l = r->disk->top;
    if (!l->discard_unmap || !l->fmt->discard)
        return 0;                   /* advisory */
    if (zero_async(l))
        return zero_host(r, l, VD_IO_PUNCH);
    pthread_mutex_lock(&l->lock);
    int ret = l->fmt->discard(l, r->off, r->len, 0);
    pthread_mutex_unlock(&l->lock);
    return ret == -ENOTSUP ? 0 : ret;
}

/* ---- block status and resize of disks with remote layers ----
 * Both call into the formats, whose tables may have to be read from (or
 * written to) the network: on a disk with a remote layer they travel as
 * core-private requests. Block status is an ordinary request of the gate
 * (it waits for a discard, zero or flush that owns the disk, and they wait
 * for it) planned on a worker like a read; resize is a metadata op (it
 * runs alone). Disks whose layers are all local answer on the spot. */

struct status_req {
    struct vd_req r;
    struct vd_extent *e;
    unsigned max;
    int n;
    vd_disk_cb cb;
    void *opaque;
};

struct resize_req {
    struct vd_req r;
    uint64_t size;
    enum vd_prealloc prealloc;
    vd_disk_cb cb;
    void *opaque;
};

/* Up to max extents from off: how many, or -errno when not even one. */
static int status_fill(struct vd_disk *d, uint64_t off, uint64_t len, struct vd_extent *e,
                       unsigned max)
{
    unsigned n = 0;
    uint64_t end = off + len;
    while (n < max && off < end) {
        int r = vd_disk_block_status(d, off, end - off, &e[n]);
        if (r < 0)
            return n ? (int)n : r;  /* the caller asks again from there */
        off += e[n].len;
        n++;
    }
    return (int)n;
}

/* On a worker (PLAN_STATUS). */
static int status_plan(struct vd_req *r)
{
    struct status_req *s = (struct status_req *)r;
    int n = status_fill(r->disk, r->off, r->len, s->e, s->max);
    if (n < 0)
        return n;
    s->n = n;
    return 0;
}

static void status_req_done(struct vd_req *r, int res)
{
    struct status_req *s = (struct status_req *)r;
    vd_disk_cb cb = s->cb;
    void *opaque = s->opaque;
    int n = s->n;
    free(s);
    cb(opaque, res < 0 ? res : n);
}

void vd_disk_block_status_async(struct vd_disk *d, uint64_t off, uint64_t len, struct vd_extent *e,
                                unsigned max, vd_disk_cb cb, void *opaque)
{
    uint64_t size = d->top->size;
    if (off >= size || len == 0 || max == 0) {
        cb(opaque, vd_err(-EINVAL, "%s: block status at offset %llu is past the end",
                          d->top->filename, (unsigned long long)off));
        return;
    }
    if (len > size - off)
        len = size - off;
    if (max > INT_MAX)
        max = INT_MAX;
    if (!d->remote) {
        cb(opaque, status_fill(d, off, len, e, max));
        return;
    }
    struct status_req *s = calloc(1, sizeof(*s));
    if (!s) {
        cb(opaque, -ENOMEM);
        return;
    }
    *s = (struct status_req){ .e = e, .max = max, .cb = cb, .opaque = opaque };
    s->r = (struct vd_req){ .op = VD_OP_STATUS_, .off = off, .len = len, .done = status_req_done };
    submit(d, &s->r, true);
}

/* On a worker (meta_run), with the disk to itself when it is gated. */
static int resize_run(struct vd_req *r)
{
    struct resize_req *z = (struct resize_req *)r;
    return vd_disk_resize_now(r->disk, z->size, z->prealloc);
}

static void resize_req_done(struct vd_req *r, int res)
{
    struct resize_req *z = (struct resize_req *)r;
    vd_disk_cb cb = z->cb;
    void *opaque = z->opaque;
    free(z);
    cb(opaque, res);
}

void vd_disk_resize_async(struct vd_disk *d, uint64_t size, enum vd_prealloc prealloc,
                          vd_disk_cb cb, void *opaque)
{
    struct vd_layer *l = d->top;
    if (!d->remote) {
        cb(opaque, vd_disk_resize_now(d, size, prealloc));
        return;
    }
    if (d->readonly) {
        cb(opaque, vd_err(-EROFS, "%s: image is read-only", l->filename));
        return;
    }
    if (!l->fmt->resize) {
        cb(opaque, vd_err(-ENOTSUP, "%s: format '%s' cannot be resized", l->filename, l->fmt->name));
        return;
    }
    struct resize_req *z = calloc(1, sizeof(*z));
    if (!z) {
        cb(opaque, -ENOMEM);
        return;
    }
    *z = (struct resize_req){ .size = size, .prealloc = prealloc, .cb = cb, .opaque = opaque };
    z->r = (struct vd_req){ .op = VD_OP_RESIZE_, .done = resize_req_done };
    submit(d, &z->r, true);
}

/* ---- planning on a worker ----
 * On a gated disk every call into the format (map, alloc, commit, the
 * copy-on-write reads, compressed units) may be metadata I/O over the
 * network, so it runs on the worker pool: a request's planning (read_range,
 * write_range), an allocating write's commit, a write that waited for an
 * allocation. The host I/O planned there is submitted by the loop when the
 * job is done (the loop's engine is the loop's alone), and the planning
 * holds a reference, so nothing of the request completes before it. */

struct plan {
    struct plan *qnext;         /* the disk's planning queue */
    struct vd_post_node node;   /* back to r's loop: plan_done */
    struct vd_req *r;
    enum plan_kind kind;
    struct waiter *w;           /* PLAN_RANGE */
    struct subio *s;            /* PLAN_COMMIT */
    int res;                    /* PLAN_COMMIT: the data write's result, then the commit's */
    int ret;                    /* PLAN_READ */
    struct vd_io *deferred, **dtail;
    int err;                    /* an error seen on the worker, and its message */
    char msg[512];
};

static void plan_defer(struct plan *p, struct vd_io *io)
{
    io->next = NULL;
    *p->dtail = io;
    p->dtail = &io->next;
}

static void plan_run(void *opaque)
{
    struct plan *p = opaque;
    struct vd_req *r = p->r;
    vd_err_clear();
    tl_plan = p;
    switch (p->kind) {
    case PLAN_READ:
        p->ret = read_range(r, r->disk->top, r->off, r->len, 0);
        break;
    case PLAN_WRITE:
        write_range(r, r->disk->top, r->off, r->len, 0);
        break;
    case PLAN_RANGE:
        write_range(r, p->w->l, p->w->off, p->w->len, p->w->pos);
        free(p->w);
        break;
    case PLAN_COMMIT:
        p->res = alloc_commit(p->s, p->res);
        break;
    case PLAN_STATUS:
        p->ret = status_plan(r);
        break;
    }
    tl_plan = NULL;
    p->err = p->ret < 0 ? p->ret : p->res < 0 ? p->res : __atomic_load_n(&r->err, __ATOMIC_RELAXED);
    if (p->err < 0)
        snprintf(p->msg, sizeof(p->msg), "%s", vd_errmsg(p->err));
}

static void plan_done(void *opaque)
{
    struct plan *p = opaque;
    struct vd_req *r = p->r;
    if (p->err < 0)
        vd_err(p->err, "%s", p->msg);
    for (struct vd_io *io = p->deferred, *next; io; io = next) {
        next = io->next;
        io->next = NULL;
        submit_host(r, (struct subio *)io);
    }
    switch (p->kind) {
    case PLAN_READ:
    case PLAN_STATUS:
        req_put(r, p->ret);
        break;
    case PLAN_WRITE:
    case PLAN_RANGE:
        req_put(r, 0);              /* the reference of the issuer, or of the waiter */
        break;
    case PLAN_COMMIT:
        subio_free(p->s);
        req_put(r, p->res);
        break;
    }
    free(p);
}

/* One worker job plans what the disk's queue holds: under load a wake-up
 * of a worker serves many requests (planning is serialised by the layer
 * lock anyway), and each goes back to its loop through a node (no lock, no
 * wake-up of a loop that is awake). What arrived meanwhile is the next
 * job's, queued behind the pool's other work, so that a busy disk never
 * keeps a worker from everyone else. */
static void planner(void *opaque)
{
    struct vd_disk *d = opaque;
    pthread_mutex_lock(&d->gate_lock);
    struct plan *p = d->plan_head;
    d->plan_head = NULL;
    d->plan_tail = &d->plan_head;
    pthread_mutex_unlock(&d->gate_lock);
    for (struct plan *q = p; q; q = q->qnext)
        plan_run(q);
    pthread_mutex_lock(&d->gate_lock);
    struct vd_loop *again = d->plan_head ? d->plan_head->r->loop : NULL;
    d->planning = again != NULL;
    pthread_mutex_unlock(&d->gate_lock);
    if (again)
        vd_loop_offload(again, planner, NULL, d);
    /* Last: once these are back, their requests may end and the disk
     * with them (d is not touched after this). */
    while (p) {
        struct plan *next = p->qnext;
        vd_loop_post_node(p->r->loop, &p->node);
        p = next;
    }
}

static void plan_start(struct vd_req *r, enum plan_kind kind, struct waiter *w, struct subio *s, int res)
{
    struct vd_disk *d = r->disk;
    struct plan *p = calloc(1, sizeof(*p));
    if (!p)
        abort();                    /* as vd_loop_post: a lost request would hang its issuer */
    *p = (struct plan){ .r = r, .kind = kind, .w = w, .s = s, .res = res };
    p->dtail = &p->deferred;
    p->node.fn = plan_done;
    p->node.opaque = p;
    pthread_mutex_lock(&d->gate_lock);
    *d->plan_tail = p;
    d->plan_tail = &p->qnext;
    bool start = !d->planning;
    d->planning = true;
    pthread_mutex_unlock(&d->gate_lock);
    if (start)
        vd_loop_offload(r->loop, planner, NULL, d);
}

/* ---- the gate: metadata ops of formats on remote files ----
 *
 * A format's discard, zero and flush are synchronous and hold the layer
 * lock; on a remote file (RBD, NBD) each metadata write in them is a
 * network round trip. They run on the worker pool instead (vd_loop_offload)
 * and finish on the request's loop. The lock rules stay as they are (the
 * worker holds layer->lock around the driver call); the gate orders them
 * with the rest: a metadata op starts only when no other request of the
 * disk is in flight, and requests submitted while it runs (or waits to run)
 * queue, in order, and start on their own loops when it is done. Reads and
 * writes otherwise pass freely, counted (and are planned on workers too). */

struct gate_wait {
    struct vd_req *r;
    int kind;                   /* -1: an ordinary request; else the metadata op */
    struct gate_wait *next;
};

static bool remote_file(const struct vd_file *f)
{
    return f && f->proto && f->proto->submit;
}

/* Gated: some layer of the chain is on a remote file, except a lone raw
 * image on a backend that does all of its I/O asynchronously itself. */
void vd_disk_gate_init(struct vd_disk *d)
{
    pthread_mutex_init(&d->gate_lock, NULL);
    d->gate_tail = &d->gate_head;
    d->plan_tail = &d->plan_head;
    bool remote = false;
    for (struct vd_layer *l = d->top; l; l = l->backing)
        remote |= remote_file(l->file);
    d->remote = remote;
    d->gated = remote && !(!d->top->backing && zero_async(d->top) && !d->top->fmt->flush);
}

void vd_disk_gate_fini(struct vd_disk *d)
{
    pthread_mutex_destroy(&d->gate_lock);
}

/* The metadata op r needs the worker for (VD_OP_…), or -1. */
static int meta_kind(const struct vd_disk *d, const struct vd_req *r)
{
    const struct vd_layer *l = d->top;
    if (r->op == VD_OP_RESIZE_)
        return VD_OP_RESIZE_;
    switch (r->op) {
    case VD_OP_FLUSH:
        return l->fmt->flush ? VD_OP_FLUSH : -1;
    case VD_OP_DISCARD:
        return l->discard_unmap && l->fmt->discard && !zero_async(l) ? VD_OP_DISCARD : -1;
    case VD_OP_WRITE_ZEROES:
        return l->fmt->zero && !zero_async(l) ? VD_OP_WRITE_ZEROES : -1;
    default:
        return -1;
    }
}

static void gate_start(void *opaque);

/* Under gate_lock: the waiters that may start now, in order. */
static struct gate_wait *gate_admit(struct vd_disk *d)
{
    struct gate_wait *go = NULL, **tail = &go;
    while (d->gate_head && !d->gate_meta) {
        struct gate_wait *w = d->gate_head;
        if (w->kind >= 0) {
            if (d->gate_active > 0)
                break;
            d->gate_meta = true;
        } else {
            d->gate_active++;
        }
        d->gate_head = w->next;
        if (!d->gate_head)
            d->gate_tail = &d->gate_head;
        w->next = NULL;
        *tail = w;
        tail = &w->next;
    }
    return go;
}

static void gate_run(struct gate_wait *go)
{
    while (go) {
        struct gate_wait *next = go->next;
        vd_loop_post(go->r->loop, gate_start, go);
        go = next;
    }
}

/* true: r may go now (an ordinary request is counted; a metadata op owns
 * the disk). false: r waits; gate_start starts it later on r->loop. */
static bool gate_enter(struct vd_disk *d, struct vd_req *r, int kind)
{
    pthread_mutex_lock(&d->gate_lock);
    bool go = !d->gate_meta && !d->gate_head && (kind < 0 || d->gate_active == 0);
    if (go) {
        if (kind >= 0)
            d->gate_meta = true;
        else {
            d->gate_active++;
            r->flags |= REQ_F_GATED;
        }
    } else {
        struct gate_wait *w = malloc(sizeof(*w));
        if (!w)
            abort();            /* as vd_loop_post: losing a request would be worse */
        *w = (struct gate_wait){ .r = r, .kind = kind };
        *d->gate_tail = w;
        d->gate_tail = &w->next;
    }
    pthread_mutex_unlock(&d->gate_lock);
    return go;
}

static void gate_leave(struct vd_disk *d)
{
    pthread_mutex_lock(&d->gate_lock);
    d->gate_active--;
    struct gate_wait *go = gate_admit(d);
    pthread_mutex_unlock(&d->gate_lock);
    gate_run(go);
}

/* The metadata op of r is done: r carries on as an ordinary request. */
static void gate_meta_end(struct vd_req *r)
{
    struct vd_disk *d = r->disk;
    pthread_mutex_lock(&d->gate_lock);
    d->gate_meta = false;
    d->gate_active++;
    r->flags |= REQ_F_GATED;
    struct gate_wait *go = gate_admit(d);
    pthread_mutex_unlock(&d->gate_lock);
    gate_run(go);
}

struct meta_job {
    struct vd_req *r;
    int kind;
    int ret;
    char msg[512];              /* the worker's error message, for the loop's thread */
};

/* On a worker: the format's synchronous op, under the layer lock. */
static void meta_run(void *opaque)
{
    struct meta_job *j = opaque;
    struct vd_req *r = j->r;
    struct vd_layer *l = r->disk->top;
    vd_err_clear();
    if (j->kind == VD_OP_RESIZE_) {     /* takes the lock and flushes itself */
        j->ret = resize_run(r);
        if (j->ret < 0)
            snprintf(j->msg, sizeof(j->msg), "%s", vd_errmsg(j->ret));
        return;
    }
    pthread_mutex_lock(&l->lock);
    switch (j->kind) {
    case VD_OP_DISCARD:
        j->ret = l->fmt->discard(l, r->off, r->len, 0);
        break;
    case VD_OP_WRITE_ZEROES:
        j->ret = l->fmt->zero(l, r->off, r->len, r->flags & (VD_REQ_MAY_UNMAP | VD_REQ_FAST_ZERO));
        break;
    default:
        j->ret = l->fmt->flush(l);
        break;
    }
    pthread_mutex_unlock(&l->lock);
    if (j->ret < 0)
        snprintf(j->msg, sizeof(j->msg), "%s", vd_errmsg(j->ret));
}

/* On r's loop: finish what the op started, as the synchronous path does. */
static void meta_done(void *opaque)
{
    struct meta_job *j = opaque;
    struct vd_req *r = j->r;
    int ret = j->ret, kind = j->kind;
    if (ret < 0 && ret != -ENOTSUP)
        vd_err(ret, "%s", j->msg);
    free(j);
    if (r->disk->gated)
        gate_meta_end(r);
    switch (kind) {
    case VD_OP_RESIZE_:             /* flushed and synced on the worker */
        break;
    case VD_OP_DISCARD:
        if (ret == -ENOTSUP)
            ret = 0;                /* advisory */
        break;
    case VD_OP_WRITE_ZEROES:
        if (ret == -ENOTSUP && !(r->flags & VD_REQ_FAST_ZERO)) {
            zeroes_fallback(r);     /* write zeros instead */
            ret = 0;
        }
        break;
    default:                        /* the metadata is out: sync the file */
        if (ret == 0) {
            struct subio *s = subio_new(r, VD_IO_SYNC, r->disk->top->file, 0, sync_done);
            if (!s)
                ret = -ENOMEM;
            else {
                ref_get(r);
                submit_host(r, s);
            }
        }
        break;
    }
    req_put(r, ret);
}

/* r owns the disk (gate_enter said so) and holds one reference. */
static void meta_start(struct vd_req *r, int kind)
{
    struct meta_job *j = calloc(1, sizeof(*j));
    if (!j) {
        if (r->disk->gated)
            gate_meta_end(r);
        req_put(r, -ENOMEM);
        return;
    }
    j->r = r;
    j->kind = kind;
    vd_loop_offload(r->loop, meta_run, meta_done, j);
}

/* ---- submission ---- */

/* The work of a request that may start now. */
static void dispatch(struct vd_req *r)
{
    struct vd_disk *d = r->disk;
    int ret = 0;
    if (r->op == VD_OP_STATUS_) {       /* remote disks only: on a worker */
        plan_start(r, PLAN_STATUS, NULL, NULL, 0);
        return;
    }
    if (r->op == VD_OP_RESIZE_) {       /* remote, not gated: on a worker, unordered */
        meta_start(r, VD_OP_RESIZE_);
        return;
    }
    switch (r->op) {
    case VD_OP_READ:
        if (d->gated) {
            plan_start(r, PLAN_READ, NULL, NULL, 0);
            return;
        }
        ret = read_range(r, d->top, r->off, r->len, 0);
        break;
    case VD_OP_WRITE:
        if (d->gated) {
            plan_start(r, PLAN_WRITE, NULL, NULL, 0);
            return;
        }
        write_range(r, d->top, r->off, r->len, 0);
        break;
    case VD_OP_FLUSH:
        ref_get(r);
        flush_start(r);
        break;
    case VD_OP_DISCARD:
        ret = discard_start(r);
        break;
    case VD_OP_WRITE_ZEROES:
        ret = zeroes_start(r);
        break;
    default:
        ret = -EINVAL;
    }
    req_put(r, ret);
}

static void gate_start(void *opaque)
{
    struct gate_wait *w = opaque;
    struct vd_req *r = w->r;
    int kind = w->kind;
    free(w);
    if (kind >= 0)
        meta_start(r, kind);
    else {
        r->flags |= REQ_F_GATED;
        dispatch(r);
    }
}

static void submit(struct vd_disk *d, struct vd_req *r, bool gate)
{
    r->disk = d;
    r->loop = vd_loop_current();
    r->err = 0;
    r->pending = 1;
    r->flags &= ~REQ_F_GATED;
    int ret = 0;
    uint64_t size = d->top->size;
    if (r->op != VD_OP_FLUSH && (r->off > size || r->len > size - r->off))
        ret = vd_err(-EINVAL, "%s: request at offset %llu, length %llu is past the end (%llu)",
                     d->top->filename, (unsigned long long)r->off, (unsigned long long)r->len,
                     (unsigned long long)size);
    else if (d->readonly && r->op != VD_OP_READ && r->op != VD_OP_FLUSH && r->op != VD_OP_STATUS_)
        ret = vd_err(-EROFS, "%s: image is read-only", d->top->filename);
    if (ret < 0 || !r->disk || !r->loop) {
        r->pending = 0;
        r->done(r, ret < 0 ? ret : -ENOMEM);
        return;
    }
    /* writethrough / directsync: every write is durable when it completes
     * (the parts of a request, submitted ungated, leave that to it) */
    if (gate && r->op != VD_OP_READ && r->op != VD_OP_FLUSH && r->op != VD_OP_STATUS_ &&
        r->op != VD_OP_RESIZE_ && (d->opts.cache == VD_CACHE_WRITETHROUGH || d->opts.cache == VD_CACHE_DIRECTSYNC))
        r->flags |= VD_REQ_FUA;
    if (gate && d->gated) {
        int kind = meta_kind(d, r);
        if (!gate_enter(d, r, kind))
            return;                 /* started by gate_start */
        if (kind >= 0) {
            meta_start(r, kind);
            return;
        }
    }
    dispatch(r);
}

void vd_disk_submit(struct vd_disk *d, struct vd_req *r)
{
    submit(d, r, true);
}
