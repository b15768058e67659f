/* vdisk convert: copy one or more images (concatenated) into a new one of
 * any format, as qemu-img convert does.
 *
 * The copy is split into chunks handed out in order from a shared cursor.
 * Block status decides each chunk's kind before anything is read: ranges
 * that read as zeros are skipped (or written as zeroes when the target does
 * not start zeroed), and with -B ranges the source's top image does not
 * hold are left to the target's backing file. Data chunks are read, scanned
 * for zero runs of at least -S bytes (not written), and written.
 *
 * Several worker threads, each with its own event loop, take chunks and
 * keep up to -m requests in flight between them. Unless -W is given, the
 * writes are issued in chunk order: a chunk that is ready early is parked
 * until its turn, then launched on its owner's loop. With -c each target
 * cluster is compressed and written by fmt->write_compressed on the worker
 * pool, so clusters compress in parallel. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <libgen.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"
#include "vdisk/error.h"

#define CHUNK_SIZE  (2u << 20)
#define MAX_SKIP    (1ull << 30)    /* largest zero / backing range one chunk covers */
#define MAX_THREADS 8

struct conv;
struct worker;

struct src {
    const char *name;
    struct vd_disk *d;
    uint64_t size, base;        /* base: offset in the concatenation */
};

enum ckind { CK_READ, CK_ZERO, CK_SKIP, CK_ALLOC };   /* CK_ALLOC: zeros, allocated (-S 0) */

struct cjob {                   /* one compressed cluster */
    struct chunk *ch;
    uint64_t off;               /* target offset */
    uint8_t *data;
    size_t len;
    uint8_t *out;               /* compress(): blob, capacity one cluster */
    size_t outlen;
    bool plain;                 /* does not compress: an ordinary write */
    struct vd_req req;
    struct iovec iov;
};

struct chunk {
    struct worker *w;
    struct chunk *next_parked;
    uint64_t seq, off, len;     /* off: target (= concatenated source) offset */
    int si;                     /* source index */
    enum ckind kind;
    uint8_t *buf;
    uint8_t *cbuf;              /* -c: compressed blobs, a cluster's room each */
    struct iovec riov;
    struct vd_req rreq;
    struct vd_req *wreq;        /* planned writes */
    struct iovec *wiov;
    int nw, wcap;
    struct cjob *cjobs;         /* planned compressed clusters */
    int ncj, cjcap;
    int pending;
    bool busy;
};

struct worker {
    struct conv *cv;
    struct vd_loop *loop;
    pthread_t th;
    int idx;
    int nslots, inflight;
    struct chunk *slots;
    bool no_more, filling;
};

struct conv {
    struct src *src;
    int nsrc;
    struct vd_disk *dst;
    struct vd_layer *dst_top;
    const char *dst_name;
    uint64_t total;
    uint64_t sparse;            /* -S: smallest zero run left unwritten; 0 = write all */
    uint64_t chunk;
    uint32_t cluster;           /* -c: target compression unit */
    bool compress, in_order, target_zero, target_backing, progress;
    enum vd_aio aio;            /* the workers' engine */

    pthread_mutex_t lock;       /* protects everything below */
    uint64_t next_off, next_seq, write_seq;
    struct chunk *parked;
    _Atomic int err;            /* written under lock, read anywhere */
    char errmsg[512];
    uint64_t done_bytes;
    struct vd_cli_progress pr;
    /* the last block status answer, reused while the cursor is inside it */
    int ext_si;
    uint64_t ext_off, ext_len;
    unsigned ext_flags;
    int ext_depth;
    /* early flushes: start write-back while copying, so the final flush
     * has little left to do. With early_kick (the default mode, whose only
     * sync is the last) they only start write-back and are not syncs. */
    uint64_t unflushed;
    bool flushing, early_kick;
    uint64_t early_flush;       /* bytes between early flushes, 0: none */
    struct vd_req flush_req;
    int kick_err;
};

#define EARLY_FLUSH (64ull << 20)

static void worker_fill(struct worker *w);
static void launch(struct chunk *ch);

/* Record the first error (message kept for the end). */
static void set_error(struct conv *cv, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_error(struct conv *cv, int err, const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&cv->lock);
    if (!cv->err) {
        cv->err = err;
        va_start(ap, fmt);
        vsnprintf(cv->errmsg, sizeof(cv->errmsg), fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&cv->lock);
}

/* ---- handing out chunks ---- */

static int source_status(struct conv *cv, int si, uint64_t soff, uint64_t len)
{
    struct src *s = &cv->src[si];
    if (cv->ext_si == si && soff >= cv->ext_off && soff < cv->ext_off + cv->ext_len)
        return 0;
    struct vd_extent e;
    vd_err_clear();
    int r = vd_disk_block_status(s->d, soff, len, &e);
    if (r < 0) {
        if (!cv->err) {
            cv->err = r;
            snprintf(cv->errmsg, sizeof(cv->errmsg), "%s: block status at offset %" PRIu64 ": %s", s->name, soff,
                     vd_errmsg(r));
        }
        return r;
    }
    cv->ext_si = si;
    cv->ext_off = soff;
    cv->ext_len = e.len ? e.len : len;
    cv->ext_flags = e.flags;
    cv->ext_depth = e.depth;
    return 0;
}

/* Classify [soff, soff+*len) of source si (under cv->lock); may shorten *len. */
static int classify(struct conv *cv, int si, uint64_t soff, uint64_t *len, enum ckind *kind)
{
    struct src *s = &cv->src[si];
    uint64_t max = s->size - soff;
    int r = source_status(cv, si, soff, max);
    if (r < 0)
        return r;
    uint64_t elen = cv->ext_off + cv->ext_len - soff;
    bool zero = cv->ext_flags & VD_EXT_ZERO;
    bool mine = (cv->ext_flags & VD_EXT_ALLOCATED) && cv->ext_depth == 0;

    if (cv->target_backing && !mine)
        *kind = CK_SKIP;                /* the target's backing file supplies it */
    else if (zero)
        *kind = cv->sparse ? CK_ZERO : CK_ALLOC;
    else
        *kind = CK_READ;

    if (cv->compress) {
        /* Whole clusters only: a chunk is zero/skip only if its whole span is. */
        uint64_t want = *len;
        if (*kind != CK_READ && elen < want) {
            uint64_t o = soff + elen;
            while (o < soff + want) {
                r = source_status(cv, si, o, s->size - o);
                if (r < 0)
                    return r;
                bool z = cv->ext_flags & VD_EXT_ZERO;
                bool m = (cv->ext_flags & VD_EXT_ALLOCATED) && cv->ext_depth == 0;
                enum ckind k = cv->target_backing && !m ? CK_SKIP : z ? CK_ZERO : CK_READ;
                if (k != *kind) {
                    *kind = CK_READ;
                    break;
                }
                o = cv->ext_off + cv->ext_len;
            }
        }
        return 0;
    }
    if (*kind == CK_READ) {
        if (elen < *len)
            *len = elen;
    } else {
        *len = elen < MAX_SKIP ? elen : MAX_SKIP;
    }
    return 0;
}

/* Take the next chunk for w into ch; false when there is none. */
static bool claim(struct worker *w, struct chunk *ch)
{
    struct conv *cv = w->cv;
    bool got = false;
    pthread_mutex_lock(&cv->lock);
    if (cv->err || cv->next_off >= cv->total)
        goto out;
    uint64_t off = cv->next_off;
    int si = 0;
    while (si < cv->nsrc - 1 && off >= cv->src[si].base + cv->src[si].size)
        si++;
    struct src *s = &cv->src[si];
    uint64_t soff = off - s->base;
    uint64_t len = s->size - soff;
    if (len > cv->chunk)
        len = cv->chunk;
    enum ckind kind;
    if (classify(cv, si, soff, &len, &kind) < 0)
        goto out;
    ch->seq = cv->next_seq++;
    ch->off = off;
    ch->len = len;
    ch->si = si;
    ch->kind = kind;
    ch->nw = ch->ncj = 0;
    ch->pending = 0;
    ch->next_parked = NULL;
    cv->next_off = off + len;
    got = true;
out:
    pthread_mutex_unlock(&cv->lock);
    return got;
}

/* ---- finishing ---- */

static void early_flush_done(struct vd_req *r, int res)
{
    struct worker *w = r->opaque;
    struct conv *cv = w->cv;
    if (res < 0)
        set_error(cv, res, "%s: error while flushing: %s", cv->dst_name, strerror(-res));
    pthread_mutex_lock(&cv->lock);
    cv->flushing = false;
    pthread_mutex_unlock(&cv->lock);
    w->inflight--;
    worker_fill(w);
}

/* On the worker pool: sync_file_range may wait for the device queue. */
static void kick_run(void *opaque)
{
    struct worker *w = opaque;
    vd_err_clear();
    w->cv->kick_err = vd_file_start_writeback(w->cv->dst_top->file, 0, 0);
}

static void kick_done(void *opaque)
{
    struct worker *w = opaque;
    struct conv *cv = w->cv;
    if (cv->kick_err < 0)
        set_error(cv, cv->kick_err, "%s", vd_errmsg(cv->kick_err));
    pthread_mutex_lock(&cv->lock);
    cv->flushing = false;
    pthread_mutex_unlock(&cv->lock);
    w->inflight--;
    worker_fill(w);
}

static void finish(struct chunk *ch)
{
    struct worker *w = ch->w;
    struct conv *cv = w->cv;
    bool flush = false;
    pthread_mutex_lock(&cv->lock);
    cv->done_bytes += ch->len;
    if (cv->progress && cv->total)
        vd_cli_progress(&cv->pr, (double)cv->done_bytes * 100.0 / (double)cv->total);
    for (int i = 0; i < ch->nw; i++)
        cv->unflushed += ch->wreq[i].len;
    if (cv->early_flush && cv->unflushed >= cv->early_flush && !cv->flushing && !cv->err && cv->next_off < cv->total) {
        cv->flushing = flush = true;
        cv->unflushed = 0;
    }
    pthread_mutex_unlock(&cv->lock);
    ch->nw = 0;
    ch->busy = false;
    w->inflight--;
    if (flush) {
        /* counted as in flight so that the worker waits for it */
        w->inflight++;
        if (cv->early_kick) {
            vd_loop_offload(w->loop, kick_run, kick_done, w);
        } else {
            cv->flush_req = (struct vd_req){ .op = VD_OP_FLUSH, .done = early_flush_done, .opaque = w };
            vd_disk_submit(cv->dst, &cv->flush_req);
        }
    }
    worker_fill(w);
}

static void finish_cb(void *opaque)
{
    finish(opaque);
}

static void launch_cb(void *opaque)
{
    launch(opaque);
}

/* Run fn(ch) on ch's worker thread. */
static void on_owner(struct worker *self, struct chunk *ch, vd_fn fn)
{
    if (ch->w == self)
        fn(ch);
    else
        vd_loop_post(ch->w->loop, fn, ch);
}

/* After an error nothing more is written: release every parked chunk. */
static void drop_parked(struct worker *self)
{
    struct conv *cv = self->cv;
    pthread_mutex_lock(&cv->lock);
    struct chunk *p = cv->parked;
    cv->parked = NULL;
    pthread_mutex_unlock(&cv->lock);
    while (p) {
        struct chunk *next = p->next_parked;
        on_owner(self, p, finish_cb);
        p = next;
    }
}

/* ch's writes are planned: launch them now, or park until it is ch's turn. */
static void ready(struct chunk *ch)
{
    struct worker *w = ch->w;
    struct conv *cv = w->cv;
    if (!cv->in_order) {
        if (cv->err)
            finish(ch);
        else
            launch(ch);
        return;
    }
    pthread_mutex_lock(&cv->lock);
    if (cv->err) {
        pthread_mutex_unlock(&cv->lock);
        finish(ch);
        drop_parked(w);
        return;
    }
    if (ch->seq != cv->write_seq) {
        ch->next_parked = cv->parked;
        cv->parked = ch;
        pthread_mutex_unlock(&cv->lock);
        return;
    }
    /* Our turn: take ch and every parked chunk that follows it in order. */
    struct chunk *run = ch, *tail = ch;
    ch->next_parked = NULL;
    cv->write_seq++;
    for (bool found = true; found;) {
        found = false;
        for (struct chunk **pp = &cv->parked; *pp; pp = &(*pp)->next_parked) {
            if ((*pp)->seq == cv->write_seq) {
                struct chunk *p = *pp;
                *pp = p->next_parked;
                p->next_parked = NULL;
                tail->next_parked = p;
                tail = p;
                cv->write_seq++;
                found = true;
                break;
            }
        }
    }
    pthread_mutex_unlock(&cv->lock);
    while (run) {
        struct chunk *next = run->next_parked;
        run->next_parked = NULL;
        on_owner(w, run, launch_cb);
        run = next;
    }
}

/* ---- writing ---- */

static void write_done(struct vd_req *r, int res)
{
    struct chunk *ch = r->opaque;
    struct conv *cv = ch->w->cv;
    if (res < 0) {
        set_error(cv, res, "%s: error while writing at offset %" PRIu64 ": %s", cv->dst_name, r->off,
                  strerror(-res));
    }
    if (--ch->pending == 0)
        finish(ch);
}

/* Compress one cluster; a cluster that does not shrink is marked plain. */
static int compress_one(struct cjob *j)
{
    struct vd_layer *l = j->ch->w->cv->dst_top;
    j->outlen = j->ch->w->cv->cluster;
    int r = l->fmt->compress(l, j->data, j->len, j->out, &j->outlen);
    if (r == -ENOSPC) {
        j->plain = true;        /* written as ordinary data in compress_done */
        return 0;
    }
    return r;
}

static void compress_error(struct conv *cv, struct cjob *j, int r)
{
    if (r == -ENOTSUP)
        set_error(cv, r, "%s: Compression not supported for this file format (%s)", cv->dst_name,
                  vd_cli_strip(vd_errmsg(r), cv->dst_name));
    else
        set_error(cv, r, "%s: error while compressing a cluster at offset %" PRIu64 ": %s", cv->dst_name, j->off,
                  vd_cli_strip(vd_errmsg(r), cv->dst_name));
}

/* On the worker pool: compress every planned cluster of a chunk without
 * the layer lock, then link the blobs in under one hold of the lock (the
 * format gathers consecutive blobs into few writes). One job per chunk
 * rather than per cluster keeps the hand-offs between threads few. */
static void compress_run(void *opaque)
{
    struct chunk *ch = opaque;
    struct conv *cv = ch->w->cv;
    struct vd_layer *l = cv->dst_top;
    const struct vd_format *f = l->fmt;
    int r = 0, i;
    vd_err_clear();
    if (!(f->compress && f->write_compressed_raw)) {
        pthread_mutex_lock(&l->lock);
        for (i = 0; i < ch->ncj && r == 0 && !cv->err; i++)
            r = f->write_compressed(l, ch->cjobs[i].off, ch->cjobs[i].data, ch->cjobs[i].len);
        pthread_mutex_unlock(&l->lock);
        if (r < 0)
            compress_error(cv, &ch->cjobs[i - 1], r);
        return;
    }
    for (i = 0; i < ch->ncj && !cv->err; i++)
        if ((r = compress_one(&ch->cjobs[i])) < 0) {
            compress_error(cv, &ch->cjobs[i], r);
            return;
        }
    pthread_mutex_lock(&l->lock);
    for (i = 0; i < ch->ncj && r == 0 && !cv->err; i++)
        if (!ch->cjobs[i].plain)
            r = f->write_compressed_raw(l, ch->cjobs[i].off, ch->cjobs[i].out, ch->cjobs[i].outlen);
    pthread_mutex_unlock(&l->lock);
    if (r < 0)
        compress_error(cv, &ch->cjobs[i - 1], r);
}

static void plain_done(struct vd_req *r, int res)
{
    struct cjob *j = r->opaque;
    struct chunk *ch = j->ch;
    if (res < 0)
        set_error(ch->w->cv, res, "%s: error while writing at offset %" PRIu64 ": %s", ch->w->cv->dst_name, r->off,
                  strerror(-res));
    if (--ch->pending == 0)
        finish(ch);
}

/* Back on the chunk's loop: clusters that did not shrink are written plain. */
static void compress_done(void *opaque)
{
    struct chunk *ch = opaque;
    struct conv *cv = ch->w->cv;
    ch->pending = 1;
    for (int i = 0; i < ch->ncj && !cv->err; i++) {
        struct cjob *j = &ch->cjobs[i];
        if (!j->plain)
            continue;
        j->iov = (struct iovec){ j->data, j->len };
        j->req = (struct vd_req){ .op = VD_OP_WRITE, .off = j->off, .len = j->len, .iov = &j->iov, .iovcnt = 1,
                                  .done = plain_done, .opaque = j };
        ch->pending++;
        vd_disk_submit(cv->dst, &j->req);
    }
    if (--ch->pending == 0)
        finish(ch);
}

static void launch(struct chunk *ch)
{
    struct conv *cv = ch->w->cv;
    int n = ch->nw + ch->ncj;
    if (n == 0 || cv->err) {
        finish(ch);
        return;
    }
    /* +1 so that requests completing inside vd_disk_submit cannot finish
     * the chunk before every request is submitted. */
    if (ch->ncj) {
        /* -c plans no ordinary writes: the pool takes the chunk's clusters */
        vd_loop_offload(ch->w->loop, compress_run, compress_done, ch);
        return;
    }
    ch->pending = n + 1;
    for (int i = 0; i < ch->nw; i++)
        vd_disk_submit(cv->dst, &ch->wreq[i]);
    if (--ch->pending == 0)
        finish(ch);
}

static struct vd_req *add_write(struct chunk *ch, enum vd_op op, uint64_t off, uint64_t len, uint8_t *data)
{
    if (ch->nw == ch->wcap) {
        int cap = ch->wcap ? ch->wcap * 2 : 8;
        struct vd_req *r = realloc(ch->wreq, (size_t)cap * sizeof(*r));
        if (!r)
            return NULL;
        ch->wreq = r;
        struct iovec *v = realloc(ch->wiov, (size_t)cap * sizeof(*v));
        if (!v)
            return NULL;
        ch->wiov = v;
        ch->wcap = cap;
    }
    int i = ch->nw++;
    ch->wiov[i] = (struct iovec){ data, (size_t)len };
    ch->wreq[i] = (struct vd_req){
        .op = op,
        .flags = op == VD_OP_WRITE_ZEROES ? VD_REQ_MAY_UNMAP : 0,
        .off = off,
        .len = len,
        .iov = data ? &ch->wiov[i] : NULL,
        .iovcnt = data ? 1 : 0,
        .done = write_done,
        .opaque = ch,
    };
    /* iov pointers are fixed up in plan_done, after the array stops moving */
    return &ch->wreq[i];
}

static int plan_compressed(struct chunk *ch)
{
    struct conv *cv = ch->w->cv;
    ch->ncj = 0;
    for (uint64_t o = 0; o < ch->len; o += cv->cluster) {
        size_t n = ch->len - o < cv->cluster ? (size_t)(ch->len - o) : cv->cluster;
        if (cv->target_zero && vd_buf_is_zero(ch->buf + o, n))
            continue;
        if (ch->ncj == ch->cjcap) {
            int cap = ch->cjcap ? ch->cjcap * 2 : 8;
            struct cjob *j = realloc(ch->cjobs, (size_t)cap * sizeof(*j));
            if (!j)
                return -ENOMEM;
            ch->cjobs = j;
            ch->cjcap = cap;
        }
        ch->cjobs[ch->ncj++] = (struct cjob){ .ch = ch, .off = ch->off + o, .data = ch->buf + o, .len = n,
                                              .out = ch->cbuf + o };
    }
    return 0;
}

/* Plan the writes of a chunk whose data is in ch->buf. */
static int plan_data(struct chunk *ch)
{
    struct conv *cv = ch->w->cv;
    if (cv->compress)
        return plan_compressed(ch);
    if (!cv->sparse) {
        if (!add_write(ch, VD_OP_WRITE, ch->off, ch->len, ch->buf))
            return -ENOMEM;
        return 0;
    }
    /* Zero detection in -S sized granules aligned to target offsets; a zero
     * run shorter than -S is written with the data around it. */
    uint64_t g = cv->sparse, pos = 0, end = ch->len;
    uint64_t run_start = 0;
    int run_kind = -1;          /* 0 zero, 1 data */
    while (pos < end) {
        uint64_t next = ((ch->off + pos) / g + 1) * g - ch->off;
        if (next > end)
            next = end;
        int k = vd_buf_is_zero(ch->buf + pos, (size_t)(next - pos)) ? 0 : 1;
        if (k == 0 && next - pos < g && run_kind == 1)
            k = 1;              /* a short zero tail: not worth a separate request */
        if (k != run_kind) {
            if (run_kind >= 0 && pos > run_start) {
                if (run_kind == 1) {
                    if (!add_write(ch, VD_OP_WRITE, ch->off + run_start, pos - run_start, ch->buf + run_start))
                        return -ENOMEM;
                } else if (!cv->target_zero) {
                    if (!add_write(ch, VD_OP_WRITE_ZEROES, ch->off + run_start, pos - run_start, NULL))
                        return -ENOMEM;
                }
            }
            run_kind = k;
            run_start = pos;
        }
        pos = next;
    }
    if (run_kind == 1) {
        if (!add_write(ch, VD_OP_WRITE, ch->off + run_start, end - run_start, ch->buf + run_start))
            return -ENOMEM;
    } else if (run_kind == 0 && !cv->target_zero) {
        if (!add_write(ch, VD_OP_WRITE_ZEROES, ch->off + run_start, end - run_start, NULL))
            return -ENOMEM;
    }
    return 0;
}

static void fix_iovs(struct chunk *ch)
{
    for (int i = 0; i < ch->nw; i++)
        if (ch->wreq[i].iov)
            ch->wreq[i].iov = &ch->wiov[i];
}

static void read_done(struct vd_req *r, int res)
{
    struct chunk *ch = r->opaque;
    struct conv *cv = ch->w->cv;
    if (res < 0) {
        set_error(cv, res, "%s: error while reading at offset %" PRIu64 ": %s", cv->src[ch->si].name, r->off,
                  strerror(-res));
    } else if (plan_data(ch) < 0) {
        set_error(cv, -ENOMEM, "out of memory");
    }
    fix_iovs(ch);
    ready(ch);
}

static void start(struct chunk *ch)
{
    struct conv *cv = ch->w->cv;
    struct src *s = &cv->src[ch->si];
    switch (ch->kind) {
    case CK_READ:
        ch->riov = (struct iovec){ ch->buf, (size_t)ch->len };
        ch->rreq = (struct vd_req){ .op = VD_OP_READ, .off = ch->off - s->base, .len = ch->len,
                                    .iov = &ch->riov, .iovcnt = 1, .done = read_done, .opaque = ch };
        vd_disk_submit(s->d, &ch->rreq);
        return;
    case CK_ZERO:
        if (!cv->target_zero && !add_write(ch, VD_OP_WRITE_ZEROES, ch->off, ch->len, NULL))
            set_error(cv, -ENOMEM, "out of memory");
        break;
    case CK_ALLOC: {
        /* -S 0: fully allocated, but zeros need not be copied: write-zeroes
         * without leave to deallocate */
        struct vd_req *r = add_write(ch, VD_OP_WRITE_ZEROES, ch->off, ch->len, NULL);
        if (!r)
            set_error(cv, -ENOMEM, "out of memory");
        else
            r->flags = 0;
        break;
    }
    case CK_SKIP:
        break;
    }
    ready(ch);
}

static void worker_fill(struct worker *w)
{
    /* Completions may call back in here while a chunk starts; the outer
     * call keeps going, so no recursion. */
    if (w->filling)
        return;
    w->filling = true;
    while (!w->no_more && w->inflight < w->nslots) {
        struct chunk *ch = NULL;
        for (int i = 0; i < w->nslots; i++)
            if (!w->slots[i].busy) {
                ch = &w->slots[i];
                break;
            }
        if (!ch || !claim(w, ch)) {
            w->no_more = true;
            break;
        }
        ch->busy = true;
        w->inflight++;
        start(ch);
    }
    if (w->no_more && w->cv->err)
        drop_parked(w);
    w->filling = false;
}

static void worker_run(struct worker *w)
{
    worker_fill(w);
    while (!(w->no_more && w->inflight == 0))
        vd_loop_run_once(w->loop, -1);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    if (vd_loop_new(w->cv->aio, &w->loop) < 0) {
        set_error(w->cv, -ENOMEM, "could not start an I/O thread: %s", vd_errmsg(-ENOMEM));
        w->loop = NULL;
        return NULL;
    }
    worker_run(w);
    return NULL;
}

/* ---- setup ---- */

static int target_opts(struct vd_opts *opts, const struct vd_format *fmt, const char *file, struct vd_opts *fopts,
                       struct vd_create_opts *co)
{
    for (size_t i = 0; i < opts->n; i++) {
        const char *k = opts->kv[i].key;
        if (!vd_cli_create_opt_known(fmt, k)) {
            vd_cli_err("%s: Invalid parameter '%s'", file, k);
            return -EINVAL;
        }
        if (!strcmp(k, "size")) {
            vd_cli_err("%s: Invalid parameter 'size': the size is the source's", file);
            return -EINVAL;
        }
        if (!strcmp(k, "backing_file") || !strcmp(k, "backing_fmt")) {
            const char **dst = k[8] == 'f' && k[9] == 'i' ? &co->backing : &co->backing_fmt;
            *dst = opts->kv[i].val;
            continue;
        }
        if (vd_opts_set(fopts, k, opts->kv[i].val) < 0)
            return -ENOMEM;
    }
    vd_err_clear();
    if (vd_prealloc_from_opts(fopts, &co->prealloc) < 0) {
        vd_cli_err("%s: %s", file, vd_errmsg(-EINVAL));
        return -EINVAL;
    }
    return 0;
}

/* The folder entry of a new target must be durable too. Local files only. */
static int sync_dir(const char *file)
{
    if (!vd_file_name_is_local(file))
        return 0;
    char *copy = strdup(file);
    if (!copy)
        return -ENOMEM;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int r = 0;
    if (fd >= 0) {
        if (fsync(fd) < 0 && errno != EINVAL && errno != EROFS)
            r = vd_err(-errno, "syncing the folder of %s failed: %s", file, strerror(errno));
        close(fd);
    }
    free(copy);
    return r;
}

static int run(int argc, char **argv)
{
    enum { OPT_TARGET_ZERO = 256, OPT_SALVAGE };
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "target-is-zero", no_argument, NULL, OPT_TARGET_ZERO },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *ifmt = NULL, *ofmt = "raw", *backing = NULL, *backing_fmt = NULL;
    struct vd_opts opts = { 0 }, fopts = { 0 };
    enum vd_cache scache = VD_CACHE_WRITEBACK, dcache = VD_CACHE_UNSAFE;
    bool dcache_given = false;
    uint64_t sparse = 4096, m = 8;
    bool compress = false, progress = false, quiet = false, no_create = false, ooo = false;
    bool target_is_zero = false, share = false, want_help = false;
    int c, rc = 1, nthreads = 0;
    struct conv cv = { .ext_si = -1 };
    struct worker *ws = NULL;
    struct vd_loop *main_loop = NULL;
    char *probed_fmt = NULL;

    pthread_mutex_init(&cv.lock, NULL);
    while ((c = getopt_long(argc, argv, ":f:O:o:B:F:S:m:t:T:l:cpqnWUC", lopts, NULL)) != -1) {
        switch (c) {
        case 'f': ifmt = optarg; break;
        case 'O': ofmt = optarg; break;
        case 'B': backing = optarg; break;
        case 'F': backing_fmt = optarg; break;
        case 'c': compress = true; break;
        case 'p': progress = true; break;
        case 'q': quiet = true; break;
        case 'n': no_create = true; break;
        case 'W': ooo = true; break;
        case 'U': share = true; break;
        case 'C': break;                /* copy offloading: plain copies are used */
        case OPT_TARGET_ZERO: target_is_zero = true; break;
        case 'o':
            if (vd_cli_opts_arg(&opts, optarg, &want_help) < 0)
                goto out;
            break;
        case 'S':
            if (vd_cli_size(optarg, &sparse, "sparse size (-S)") < 0)
                goto out;
            if (sparse > 0 && (sparse % 512 || sparse > CHUNK_SIZE)) {
                vd_cli_err("Invalid buffer size for sparse output specified. "
                           "Valid sizes are multiples of 512 up to %u.", CHUNK_SIZE);
                goto out;
            }
            break;
        case 'm': {
            char *end;
            unsigned long v = strtoul(optarg, &end, 10);
            if (*end || v < 1 || v > 64) {
                vd_cli_err("Invalid number of requests in flight (-m): '%s' (1 to 64)", optarg);
                goto out;
            }
            m = v;
            break;
        }
        case 't':
            if (vd_cli_cache(optarg, &dcache) < 0)
                goto out;
            dcache_given = true;
            break;
        case 'T':
            if (vd_cli_cache(optarg, &scache) < 0)
                goto out;
            break;
        case 'l':
            vd_cli_err("Snapshots (-l) are not supported by convert; see 'vdisk snapshot'");
            goto out;
        default:
            rc = vd_cli_bad_option(argv[0], c, argv);
            goto out;
        }
    }
    const struct vd_format *of = vd_format_find(ofmt);
    if (!of) {
        vd_cli_err("Unknown file format '%s'", ofmt);
        goto out;
    }
    if (want_help) {
        vd_cli_print_create_opts(of);
        rc = 0;
        goto out;
    }
    if (argc - optind < 2) {
        rc = vd_cli_usage(argv[0], "Expecting a source and a target file name");
        goto out;
    }
    if (quiet)
        progress = false;
    if (no_create && (opts.n || backing)) {
        vd_cli_err("-n cannot be combined with -o or -B (the target exists)");
        goto out;
    }
    if (backing_fmt && !backing) {
        vd_cli_err("-F (backing format) requires -B");
        goto out;
    }
    if (compress && sparse == 0)
        sparse = 4096;

    cv.dst_name = argv[argc - 1];
    cv.nsrc = argc - optind - 1;
    cv.src = calloc((size_t)cv.nsrc, sizeof(*cv.src));
    if (!cv.src)
        goto out;
    for (int i = 0; i < cv.nsrc; i++) {
        struct src *s = &cv.src[i];
        struct vd_cli_open so = { .format = ifmt, .readonly = true, .force_share = share, .cache = scache };
        s->name = argv[optind + i];
        if (vd_cli_open(s->name, &so, &s->d) < 0)
            goto out;
        s->size = vd_disk_size(s->d);
        s->base = cv.total;
        cv.total += s->size;
    }

    struct vd_create_opts co = { .opts = &fopts, .size = cv.total, .backing = backing, .backing_fmt = backing_fmt };
    if (!no_create) {
        if (target_opts(&opts, of, cv.dst_name, &fopts, &co) < 0)
            goto out;
        if (co.backing && !*co.backing)
            co.backing = NULL;
        if (co.backing && !co.backing_fmt) {
            /* as qemu-img: a backing format is needed; probe it */
            char *path = vd_cli_backing_path(cv.dst_name, co.backing);
            struct vd_cli_open bo = { .format_opt = "-F", .readonly = true, .force_share = true };
            struct vd_disk *bd;
            if (!path || vd_cli_open(path, &bo, &bd) < 0) {
                free(path);
                vd_cli_err("%s: Could not open backing file '%s'", cv.dst_name, co.backing);
                goto out;
            }
            free(path);
            probed_fmt = strdup(vd_disk_top(bd)->fmt->name);
            co.backing_fmt = probed_fmt;
            vd_disk_close(bd);
        }
        vd_err_clear();
        int r = vd_image_create(cv.dst_name, of->name, &co);
        if (r < 0) {
            vd_cli_err_file(cv.dst_name, r);
            goto out;
        }
    }
    struct vd_cli_open dopt = { .format = of->name, .cache = dcache, .no_backing = true };
    if (vd_cli_open(cv.dst_name, &dopt, &cv.dst) < 0)
        goto out;
    cv.dst_top = vd_disk_top(cv.dst);
    if (vd_disk_size(cv.dst) < cv.total) {
        vd_cli_err("%s: the target (%" PRIu64 " bytes) is smaller than the source (%" PRIu64 " bytes)", cv.dst_name,
                   vd_disk_size(cv.dst), cv.total);
        goto out;
    }
    /* A target that stores only whole compressed units (streamOptimized
     * VMDK) is written through the -c pipeline, as qemu-img does. */
    if (cv.dst_top->compressed_only)
        compress = true;
    cv.target_backing = co.backing != NULL;
    cv.target_zero = no_create ? target_is_zero : !cv.target_backing;
    cv.sparse = sparse;
    cv.compress = compress;
    cv.in_order = !ooo;
    cv.progress = progress;
    cv.chunk = CHUNK_SIZE;
    /* Early flushes start write-back while copying so that the final sync
     * has little left to do: flushes with -t writeback / none, and
     * write-back starts without a sync by default. Nothing with -t unsafe
     * (no final sync to shorten) or writethrough (every write synced). */
    cv.early_flush = dcache == VD_CACHE_WRITEBACK || dcache == VD_CACHE_NONE || !dcache_given ? EARLY_FLUSH : 0;
    cv.early_kick = !dcache_given;
    const char *ef = getenv("VDISK_CONVERT_FLUSH_MB");     /* tuning knob for benchmarks */
    if (ef && cv.early_flush)
        cv.early_flush = strtoull(ef, NULL, 10) << 20;
    if (compress) {
        uint32_t cl = cv.dst_top->cluster_size ? cv.dst_top->cluster_size : cv.dst_top->alloc_unit;
        if (!cv.dst_top->fmt->write_compressed || !cl) {
            vd_cli_err("%s: Compression not supported for this file format", cv.dst_name);
            goto out;
        }
        cv.cluster = cl;
        cv.chunk = ((uint64_t)CHUNK_SIZE + cl - 1) / cl * cl;
        for (int i = 0; i + 1 < cv.nsrc; i++)
            if (cv.src[i].size % cl) {
                vd_cli_err("%s: with -c, every source but the last must be a multiple of the cluster size (%u)",
                           cv.src[i].name, cl);
                goto out;
            }
    }

    /* The engine: buffered copies go faster through the thread pool than
     * through io_uring, which hands buffered writes to its own kernel
     * workers (corpus, -S 4k, durable: 0.59 s vs 0.90 s median of 7; -S 0
     * 0.55 s vs 0.89 s); O_DIRECT keeps the default. VDISK_AIO decides
     * when set. */
    const char *aio_env = getenv("VDISK_AIO");
    cv.aio = VD_AIO_DEFAULT;
    if (!(aio_env && *aio_env) && !vd_cache_direct(dcache) && !vd_cache_direct(scache))
        cv.aio = VD_AIO_THREADS;

    /* Threads: one per core (at most MAX_THREADS), each with a share of -m. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    nthreads = ncpu > 1 ? (int)ncpu : 1;
    if (nthreads > MAX_THREADS)
        nthreads = MAX_THREADS;
    if ((uint64_t)nthreads > m)
        nthreads = (int)m;
    const char *env = getenv("VDISK_CONVERT_THREADS");
    if (env && atoi(env) > 0 && atoi(env) <= MAX_THREADS)
        nthreads = atoi(env);
    ws = calloc((size_t)nthreads, sizeof(*ws));
    if (!ws)
        goto out;
    for (int i = 0; i < nthreads; i++) {
        struct worker *w = &ws[i];
        w->cv = &cv;
        w->idx = i;
        w->nslots = (int)(m / (uint64_t)nthreads + ((uint64_t)i < m % (uint64_t)nthreads));
        if (w->nslots < 1)
            w->nslots = 1;
        w->slots = calloc((size_t)w->nslots, sizeof(*w->slots));
        if (!w->slots)
            goto out;
        for (int j = 0; j < w->nslots; j++) {
            w->slots[j].w = w;
            w->slots[j].buf = vd_alloc_aligned(cv.chunk);
            if (compress)
                w->slots[j].cbuf = malloc(cv.chunk);
            if (!w->slots[j].buf || (compress && !w->slots[j].cbuf)) {
                vd_cli_err("out of memory");
                goto out;
            }
        }
    }
    vd_cli_progress_init(&cv.pr, progress);
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&ws[i].th, NULL, worker_main, &ws[i]) != 0) {
            ws[i].no_more = true;
            ws[i].nslots = 0;
        }
    }
    if (cv.aio == VD_AIO_DEFAULT)
        ws[0].loop = vd_loop_current();
    else if (vd_loop_new(cv.aio, &main_loop) == 0)
        ws[0].loop = main_loop;
    if (!ws[0].loop)
        set_error(&cv, -ENOMEM, "could not start the event loop");
    else
        worker_run(&ws[0]);
    for (int i = 1; i < nthreads; i++)
        if (ws[i].nslots)
            pthread_join(ws[i].th, NULL);
    if (cv.err) {
        vd_cli_err("%s", cv.errmsg);
        goto out;
    }
    vd_err_clear();
    /* Without -t the copy ran with cache=unsafe (no syncs: the target is
     * not complete before the end anyway) and is made durable here, once,
     * so that `convert && rm source` cannot lose data. -t unsafe skips even
     * that (qemu-img's default); other modes synced as they went. */
    int r = dcache_given ? vd_disk_close(cv.dst) : vd_disk_close_durable(cv.dst);
    cv.dst = NULL;
    if (r == 0 && !dcache_given && !no_create)
        r = sync_dir(cv.dst_name);
    if (r < 0) {
        vd_cli_err("%s: error while flushing: %s", cv.dst_name, vd_errmsg(r));
        goto out;
    }
    vd_cli_progress_end(&cv.pr);
    rc = 0;
out:
    if (ws) {
        for (int i = 0; i < nthreads; i++) {
            for (int j = 0; ws[i].slots && j < ws[i].nslots; j++) {
                free(ws[i].slots[j].buf);
                free(ws[i].slots[j].cbuf);
                free(ws[i].slots[j].wreq);
                free(ws[i].slots[j].wiov);
                free(ws[i].slots[j].cjobs);
            }
            free(ws[i].slots);
            if (i > 0 && ws[i].loop)
                vd_loop_free(ws[i].loop);
        }
        free(ws);
    }
    if (cv.dst)
        vd_disk_close(cv.dst);
    for (int i = 0; cv.src && i < cv.nsrc; i++)
        if (cv.src[i].d)
            vd_disk_close(cv.src[i].d);
    free(cv.src);
    vd_loop_free(main_loop);
    free(probed_fmt);
    vd_opts_free(&opts);
    vd_opts_free(&fopts);
    pthread_mutex_destroy(&cv.lock);
    return rc;
}

static const struct vd_cli_cmd cmd_convert = {
    "convert",
    "[-c] [-p] [-q] [-n] [-W] [-f fmt] [-O output_fmt] [-o options] [-B backing_file [-F backing_fmt]]\n"
    "              [-S sparse_size] [-m num_requests] [-t cache] [-T src_cache] [--target-is-zero] [-U]\n"
    "              filename [filename2 [...]] output_filename",
    "Copy images (several are concatenated) into a new image, of any format.\n"
    "  -f fmt / -O fmt  source / target format (source probed when omitted, a raw\n"
    "                   source needs -f raw; target default raw)\n"
    "  -o options       target format options (-o help lists them)\n"
    "  -B file [-F fmt] give the target this backing file; only what differs from\n"
    "                   it (what the source's top image holds) is copied\n"
    "  -c               compress the target (formats that can: qcow2, vmdk)\n"
    "  -S size          zero runs of at least size bytes are not written (default 4k;\n"
    "                   -S 0 writes everything: a fully allocated target)\n"
    "  -m N             requests in flight (default 8), shared by one thread per core\n"
    "  -W               allow writes out of order (faster; the target is less sequential)\n"
    "  -n               the target exists: do not create it (use --target-is-zero\n"
    "                   when it already reads as zeros, so that zeros are not written)\n"
    "  -t cache         target cache mode. Default: no syncs while copying, one\n"
    "                   sync of the target at the end (durable when convert exits).\n"
    "                   unsafe: no sync at all (qemu-img's default; the target may\n"
    "                   be lost on a host crash); writeback: syncs as a format\n"
    "                   orders its metadata, and at the end; none: O_DIRECT, synced\n"
    "                   like writeback; writethrough / directsync: every write synced\n"
    "  -T cache         source cache mode (writeback, none, ...)\n"
    "  -p               show progress;  -q  quiet;  -U  do not lock the sources\n",
    run,
};
VD_CLI_COMMAND(cmd_convert)
