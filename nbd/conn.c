/* One NBD client connection on an event loop: handshake (through the byte
 * parser in handshake.c), optional TLS, then transmission with many
 * requests in flight and replies sent as they complete (out of order).
 *
 * Memory per connection is bounded: at most max_inflight requests and
 * VD_NBD_MAX_INFLIGHT_BYTES of buffers are held between reading a request
 * and finishing its reply; past that the connection stops reading, so a
 * client that never reads its replies only stalls itself. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include "nbd/nbd_proto.h"
#include "nbd/nbd_server.h"
#include "nbd/nbd_tls.h"
#include "vdisk/block.h"
#include "vdisk/error.h"
#include "vdisk/export.h"

#define IN_CAP     (256u * 1024)
#define STAGE_CAP  (64u * 1024)
#define HS_OUT_MAX (64u * 1024)    /* stop reading options while this much is unsent */
#define MAX_IOV    256

static struct vd_nbd_server_config cfg = { .max_inflight = VD_NBD_MAX_INFLIGHT,
                                            .handshake_seconds = VD_NBD_HANDSHAKE_SECONDS,
                                            .drain_seconds = VD_NBD_DRAIN_SECONDS };

void vd_nbd_server_configure(const struct vd_nbd_server_config *c)
{
    cfg = *c;
    if (!cfg.max_inflight)
        cfg.max_inflight = VD_NBD_MAX_INFLIGHT;
    if (!cfg.handshake_seconds)
        cfg.handshake_seconds = VD_NBD_HANDSHAKE_SECONDS;
    if (!cfg.drain_seconds)
        cfg.drain_seconds = VD_NBD_DRAIN_SECONDS;
}

enum phase { P_HS, P_TLS, P_XMIT };

struct conn;

struct nreq {
    struct conn *c;
    struct vd_req r;
    struct vd_nbd_request h;
    struct iovec iov;
    uint8_t *buf;               /* READ / WRITE / CACHE data */
    uint64_t t0;
    uint32_t cost;              /* bytes counted against the connection */
    uint32_t got;               /* WRITE payload received so far */
    /* the reply */
    struct iovec *oiov;
    int oiovcnt;
    size_t olen;
    uint8_t *ohdr;              /* chunk headers, when more than fit in small */
    struct iovec small_iov[4];
    uint8_t small[64];
    struct nreq *next;
};

struct conn {
    struct vd_loop *loop;
    int rfd, wfd;
    char peer[80];
    SSL *ssl;
    enum phase phase;
    struct vd_nbd_hs hs;
    /* input */
    uint8_t *in;
    size_t in_pos, in_len;
    struct nreq *rx;            /* WRITE whose payload is arriving */
    uint64_t discard;           /* payload bytes of a refused WRITE to drop */
    struct nreq *discard_req;   /* its error reply, sent once the payload is gone */
    /* output: replies in completion order */
    struct nreq *oq, **oq_tail;
    size_t osent;               /* bytes of oq's head already sent */
    uint8_t *stage;             /* TLS: plaintext waiting for SSL_write */
    size_t stage_len, stage_off;
    bool tls_rd_wants_w, tls_wr_wants_r;
    /* accounting */
    unsigned inflight;          /* requests read, reply not yet fully sent */
    unsigned pending_io;        /* of those, still inside the disk */
    uint64_t inflight_bytes;
    /* state */
    bool read_closed;           /* EOF, NBD_CMD_DISC or shutdown: read no more */
    bool dead;                  /* drop output, close when the disk is done */
    bool busy, again;           /* progress() re-entrancy */
    bool rd_idle;               /* the last read found nothing: wait for EPOLLIN */
    bool draining;              /* export removal / shutdown: serve what the client
                                 * has already sent, send every reply, then close */
    uint64_t drain_timer;       /* bounds the drain for a client that stops reading */
    int64_t drain_left;         /* bytes the socket held when the drain began and
                                 * not yet read; -1: unknown (TLS), read to EAGAIN */
    bool dirty;                 /* on this thread's list of replies to push out */
    struct conn *dnext;
    uint64_t hs_timer;          /* closes a connection stuck in the handshake */
    uint32_t ev_r, ev_w;        /* registered epoll masks (0 = not registered) */
    bool reg_r, reg_w;
    struct vd_export *exp;
    struct vd_disk *disk;
    struct vd_nbd_session s;
    uint64_t requests;
    struct conn *lnext, *lprev;
};

/* ---- connection registry (for export removal and shutdown) ---- */

#define MAX_LOOPS 256
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct conn *conns;
static unsigned nconns;
static struct vd_loop *loops[MAX_LOOPS];
static unsigned nloops;

static void reg_add(struct conn *c)
{
    pthread_mutex_lock(&reg_lock);
    c->lnext = conns;
    c->lprev = NULL;
    if (conns)
        conns->lprev = c;
    conns = c;
    nconns++;
    unsigned i;
    for (i = 0; i < nloops && loops[i] != c->loop; i++)
        ;
    if (i == nloops && nloops < MAX_LOOPS)
        loops[nloops++] = c->loop;
    pthread_mutex_unlock(&reg_lock);
}

static unsigned reg_del(struct conn *c)
{
    pthread_mutex_lock(&reg_lock);
    if (c->lprev)
        c->lprev->lnext = c->lnext;
    else
        conns = c->lnext;
    if (c->lnext)
        c->lnext->lprev = c->lprev;
    unsigned left = --nconns;
    pthread_mutex_unlock(&reg_lock);
    return left;
}

unsigned vd_nbd_connections(void)
{
    pthread_mutex_lock(&reg_lock);
    unsigned n = nconns;
    pthread_mutex_unlock(&reg_lock);
    return n;
}

static void progress(struct conn *c);

/* Replies completed during one loop iteration go out together: completions
 * mark their connection dirty and a zero-delay timer (which runs after the
 * iteration's events) sends each dirty connection's queue with one write. */
static __thread struct conn *dirty_head;
static __thread bool flush_armed;

static void flush_dirty(void *opaque)
{
    flush_armed = false;
    while (dirty_head) {
        struct conn *c = dirty_head;
        dirty_head = c->dnext;
        c->dirty = false;
        progress(c);
    }
}

static void mark_dirty(struct conn *c)
{
    if (c->dirty)
        return;
    c->dirty = true;
    c->dnext = dirty_head;
    dirty_head = c;
    if (!flush_armed) {
        flush_armed = true;
        vd_loop_timer(c->loop, 0, flush_dirty, NULL);
    }
}

static void undirty(struct conn *c)
{
    if (!c->dirty)
        return;
    for (struct conn **pp = &dirty_head; *pp; pp = &(*pp)->dnext)
        if (*pp == c) {
            *pp = c->dnext;
            break;
        }
    c->dirty = false;
}

/* ---- export lookup for the handshake ---- */

static uint16_t export_tflags(struct vd_export *e)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_DF |
                 NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
    if (e->readonly)
        f |= NBD_FLAG_READ_ONLY;
    else
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    return f;
}

static void *hs_open(void *opaque, const char *name, struct vd_nbd_export_info *info)
{
    struct vd_export *e = vd_export_get(name, "nbd");
    if (!e)
        return NULL;
    info->size = vd_disk_size(e->disk);
    info->tflags = export_tflags(e);
    info->name = e->name;
    info->description = e->description;
    return e;
}

static void hs_close(void *opaque, void *h)
{
    vd_export_put(h);
}

struct list_ctx {
    void (*emit)(void *ctx, const char *name, const char *desc);
    void *ctx;
};

static void list_one(struct vd_export *e, void *opaque)
{
    struct list_ctx *l = opaque;
    if (!strcmp(e->type->name, "nbd") && !atomic_load(&e->removing))
        l->emit(l->ctx, e->name, e->description);
}

static void hs_list(void *opaque, void (*emit)(void *ctx, const char *name, const char *desc), void *ctx)
{
    struct list_ctx l = { emit, ctx };
    vd_export_foreach(list_one, &l);
}

static const struct vd_nbd_hs_ops hs_ops = { hs_open, hs_close, hs_list };

/* ---- transport (plain or TLS) ---- */

/* >0 bytes, 0 at EOF, -EAGAIN, or -errno. */
static ssize_t xread(struct conn *c, void *buf, size_t len)
{
    if (c->ssl) {
        c->tls_rd_wants_w = false;
        ERR_clear_error();
        int n = SSL_read(c->ssl, buf, (int)(len > INT32_MAX ? INT32_MAX : len));
        if (n > 0)
            return n;
        switch (SSL_get_error(c->ssl, n)) {
        case SSL_ERROR_WANT_READ: return -EAGAIN;
        case SSL_ERROR_WANT_WRITE: c->tls_rd_wants_w = true; return -EAGAIN;
        case SSL_ERROR_ZERO_RETURN: return 0;
        default: return -ECONNRESET;
        }
    }
    for (;;) {
        ssize_t n = read(c->rfd, buf, len);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    }
}

static int stage_flush(struct conn *c)
{
    c->tls_wr_wants_r = false;
    while (c->stage_off < c->stage_len) {
        ERR_clear_error();
        int n = SSL_write(c->ssl, c->stage + c->stage_off, (int)(c->stage_len - c->stage_off));
        if (n > 0) {
            c->stage_off += (size_t)n;
            continue;
        }
        switch (SSL_get_error(c->ssl, n)) {
        case SSL_ERROR_WANT_WRITE: return -EAGAIN;
        case SSL_ERROR_WANT_READ: c->tls_wr_wants_r = true; return -EAGAIN;
        default: return -EPIPE;
        }
    }
    c->stage_len = c->stage_off = 0;
    return 0;
}

/* Take bytes from iov toward the client: how many were taken (0 when
 * blocked), or -errno when the connection is broken. */
static ssize_t xwritev(struct conn *c, const struct iovec *iov, int cnt)
{
    if (c->ssl) {
        int r = stage_flush(c);
        if (r == -EAGAIN)
            return 0;
        if (r < 0)
            return r;
        size_t took = 0;
        for (int i = 0; i < cnt && c->stage_len < STAGE_CAP; i++) {
            size_t n = iov[i].iov_len;
            if (n > STAGE_CAP - c->stage_len)
                n = STAGE_CAP - c->stage_len;
            memcpy(c->stage + c->stage_len, iov[i].iov_base, n);
            c->stage_len += n;
            took += n;
        }
        r = stage_flush(c);
        if (r < 0 && r != -EAGAIN)
            return r;
        return (ssize_t)took;
    }
    for (;;) {
        struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)cnt };
        ssize_t n = sendmsg(c->wfd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == ENOTSOCK)
            n = writev(c->wfd, iov, cnt);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -errno;
    }
}

/* ---- request buffers ----
 * Per-thread free lists by power-of-two size class: a fresh 1 MiB buffer
 * per request costs page faults and munmap on every request. Bounded so
 * that an idle thread keeps at most BUF_CACHE_MAX bytes. */
#define BUF_MIN_SHIFT 12
#define BUF_CLASSES   14               /* 4 KiB .. 32 MiB */
#define BUF_CACHE_MAX (32u << 20)
struct freebuf { struct freebuf *next; };
static __thread struct freebuf *buf_free[BUF_CLASSES];
static __thread size_t buf_cached;

static pthread_key_t buf_key;
static pthread_once_t buf_once = PTHREAD_ONCE_INIT;

/* Thread exit: give the cached buffers back. */
static void buf_drain(void *unused)
{
    for (unsigned c = 0; c < BUF_CLASSES; c++)
        while (buf_free[c]) {
            struct freebuf *b = buf_free[c];
            buf_free[c] = b->next;
            free(b);
        }
    buf_cached = 0;
}

static void buf_key_make(void)
{
    pthread_key_create(&buf_key, buf_drain);
}

static unsigned buf_class(size_t len)
{
    unsigned c = 0;
    while (((size_t)1 << (BUF_MIN_SHIFT + c)) < len)
        c++;
    return c;
}

static void *buf_get(size_t len)
{
    unsigned c = buf_class(len);
    if (c >= BUF_CLASSES)
        return vd_alloc_aligned(len);
    struct freebuf *b = buf_free[c];
    if (b) {
        buf_free[c] = b->next;
        buf_cached -= (size_t)1 << (BUF_MIN_SHIFT + c);
        return b;
    }
    return vd_alloc_aligned((size_t)1 << (BUF_MIN_SHIFT + c));
}

static void buf_put(void *p, size_t len)
{
    if (!p)
        return;
    unsigned c = buf_class(len);
    size_t sz = (size_t)1 << (BUF_MIN_SHIFT + c);
    if (c >= BUF_CLASSES || buf_cached + sz > BUF_CACHE_MAX) {
        free(p);
        return;
    }
    if (!buf_cached) {
        pthread_once(&buf_once, buf_key_make);
        pthread_setspecific(buf_key, (void *)1);
    }
    struct freebuf *b = p;
    b->next = buf_free[c];
    buf_free[c] = b;
    buf_cached += sz;
}

/* ---- requests ---- */

static void nreq_free(struct nreq *q)
{
    buf_put(q->buf, q->h.len);
    if (q->oiov != q->small_iov)
        free(q->oiov);
    free(q->ohdr);
    free(q);
}

static void finish_sent(struct conn *c, struct nreq *q)
{
    c->inflight--;
    c->inflight_bytes -= q->cost;
    nreq_free(q);
}

static void enqueue(struct conn *c, struct nreq *q)
{
    q->next = NULL;
    *c->oq_tail = q;
    c->oq_tail = &q->next;
}

static void hdr_simple(uint8_t *p, uint32_t err, uint64_t cookie)
{
    vd_be32(p, NBD_SIMPLE_REPLY_MAGIC);
    vd_be32(p + 4, err);
    vd_be64(p + 8, cookie);
}

static void hdr_chunk(uint8_t *p, uint16_t flags, uint16_t type, uint64_t cookie, uint32_t len)
{
    vd_be32(p, NBD_STRUCTURED_REPLY_MAGIC);
    vd_be16(p + 4, flags);
    vd_be16(p + 6, type);
    vd_be64(p + 8, cookie);
    vd_be32(p + 16, len);
}

static uint32_t errno_to_nbd(int err)
{
    switch (err) {
    case -EPERM: case -EROFS: case -EACCES: return NBD_EPERM;
    case -ENOMEM: return NBD_ENOMEM;
    case -EINVAL: case -ERANGE: return NBD_EINVAL;
    case -ENOSPC: case -EDQUOT: case -EFBIG: return NBD_ENOSPC;
    case -EOVERFLOW: return NBD_EOVERFLOW;
    case -ENOTSUP: return NBD_ENOTSUP;
    case -ESHUTDOWN: return NBD_ESHUTDOWN;
    default: return NBD_EIO;
    }
}

/* An error reply: an ERROR chunk with the message when structured replies
 * are on, else a simple reply. */
static void reply_error(struct conn *c, struct nreq *q, uint32_t err, const char *msg)
{
    q->oiov = q->small_iov;
    if (!c->s.structured) {
        hdr_simple(q->small, err, q->h.cookie);
        q->small_iov[0] = (struct iovec){ q->small, 16 };
        q->oiovcnt = 1;
        q->olen = 16;
        return;
    }
    size_t mlen = msg ? strlen(msg) : 0;
    if (mlen > 4096)
        mlen = 4096;
    hdr_chunk(q->small, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, q->h.cookie, (uint32_t)(6 + mlen));
    vd_be32(q->small + 20, err);
    vd_be16(q->small + 24, (uint16_t)mlen);
    q->small_iov[0] = (struct iovec){ q->small, 26 };
    q->small_iov[1] = (struct iovec){ (void *)msg, mlen };
    q->oiovcnt = mlen ? 2 : 1;
    q->olen = 26 + mlen;
    /* msg must outlive the reply: keep a copy in ohdr */
    if (mlen) {
        q->ohdr = malloc(mlen);
        if (q->ohdr) {
            memcpy(q->ohdr, msg, mlen);
            q->small_iov[1].iov_base = q->ohdr;
        } else {
            q->oiovcnt = 1;
            vd_be16(q->small + 24, 0);
            hdr_chunk(q->small, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, q->h.cookie, 6);
            q->olen = 26;
        }
    }
}

static void reply_ok(struct conn *c, struct nreq *q)
{
    hdr_simple(q->small, 0, q->h.cookie);
    q->small_iov[0] = (struct iovec){ q->small, 16 };
    q->oiov = q->small_iov;
    q->oiovcnt = 1;
    q->olen = 16;
}

#define HOLE_UNIT 4096u

/* READ with structured replies: data chunks, and hole chunks for runs of
 * whole zero blocks, so that sparse areas cost 32 bytes on the wire. */
static int reply_read_structured(struct conn *c, struct nreq *q)
{
    uint32_t len = q->h.len;
    uint64_t cookie = q->h.cookie, off = q->h.off;
    if (len == 0 || (q->h.flags & NBD_CMD_FLAG_DF) || len <= HOLE_UNIT) {
        q->oiov = q->small_iov;
        if (len && vd_buf_is_zero(q->buf, len)) {
            hdr_chunk(q->small, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            vd_be64(q->small + 20, off);
            vd_be32(q->small + 28, len);
            q->small_iov[0] = (struct iovec){ q->small, 32 };
            q->oiovcnt = 1;
            q->olen = 32;
        } else if (len) {
            hdr_chunk(q->small, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
            vd_be64(q->small + 20, off);
            q->small_iov[0] = (struct iovec){ q->small, 28 };
            q->small_iov[1] = (struct iovec){ q->buf, len };
            q->oiovcnt = 2;
            q->olen = 28 + (size_t)len;
        } else {
            hdr_chunk(q->small, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
            q->small_iov[0] = (struct iovec){ q->small, 20 };
            q->oiovcnt = 1;
            q->olen = 20;
        }
        return 0;
    }
    /* Runs of data / zero blocks: at most one chunk per block. */
    uint32_t nblk = (len + HOLE_UNIT - 1) / HOLE_UNIT;
    size_t maxchunks = nblk + 1;
    q->ohdr = malloc(maxchunks * 32);
    q->oiov = malloc(maxchunks * 2 * sizeof *q->oiov);
    if (!q->ohdr || !q->oiov) {
        free(q->oiov);
        free(q->ohdr);
        q->oiov = NULL;
        q->ohdr = NULL;
        return -ENOMEM;
    }
    int n = 0;
    size_t olen = 0;
    uint8_t *h = q->ohdr, *last = h;     /* len > HOLE_UNIT here: the loop runs */
    uint32_t pos = 0;
    while (pos < len) {
        uint32_t b = len - pos < HOLE_UNIT ? len - pos : HOLE_UNIT;
        bool zero = vd_buf_is_zero(q->buf + pos, b);
        uint32_t end = pos + b;
        while (end < len) {
            uint32_t nb = len - end < HOLE_UNIT ? len - end : HOLE_UNIT;
            if (vd_buf_is_zero(q->buf + end, nb) != zero)
                break;
            end += nb;
        }
        last = h;
        if (zero) {
            hdr_chunk(h, 0, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            vd_be64(h + 20, off + pos);
            vd_be32(h + 28, end - pos);
            q->oiov[n++] = (struct iovec){ h, 32 };
            olen += 32;
        } else {
            hdr_chunk(h, 0, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + (end - pos));
            vd_be64(h + 20, off + pos);
            q->oiov[n++] = (struct iovec){ h, 28 };
            q->oiov[n++] = (struct iovec){ q->buf + pos, end - pos };
            olen += 28 + (end - pos);
        }
        h += 32;
        pos = end;
    }
    if (last)   /* len > 0 here, so there is at least one chunk */
        vd_be16(last + 4, NBD_REPLY_FLAG_DONE);
    q->oiovcnt = n;
    q->olen = olen;
    return 0;
}

static void reply_read(struct conn *c, struct nreq *q)
{
    if (c->s.structured) {
        if (reply_read_structured(c, q) < 0)
            reply_error(c, q, NBD_ENOMEM, "out of memory building the reply");
        return;
    }
    hdr_simple(q->small, 0, q->h.cookie);
    q->small_iov[0] = (struct iovec){ q->small, 16 };
    q->small_iov[1] = (struct iovec){ q->buf, q->h.len };
    q->oiov = q->small_iov;
    q->oiovcnt = q->h.len ? 2 : 1;
    q->olen = 16 + (size_t)q->h.len;
}

/* ---- block status ---- */

struct desc_list {
    uint8_t *p;       /* pairs of be32 length, be32 flags */
    unsigned n, max;
    uint64_t covered;
};

static void desc_add(struct desc_list *d, uint64_t len, uint32_t flags)
{
    while (len) {
        if (d->n && vd_rd32(d->p + 8 * (d->n - 1) + 4) == flags) {
            uint64_t cur = vd_rd32(d->p + 8 * (d->n - 1));
            uint64_t take = len < 0xfffff000u - cur ? len : 0xfffff000u - cur;
            if (take) {
                vd_be32(d->p + 8 * (d->n - 1), (uint32_t)(cur + take));
                d->covered += take;
                len -= take;
                continue;
            }
        }
        if (d->n == d->max)
            return;
        uint64_t take = len < 0xfffff000u ? len : 0xfffff000u;
        vd_be32(d->p + 8 * d->n, (uint32_t)take);
        vd_be32(d->p + 8 * d->n + 4, flags);
        d->n++;
        d->covered += take;
        len -= take;
    }
}

/* A block status request in progress. The disk answers a batch of extents
 * at a time (vd_disk_block_status_async): at once for local disks, later,
 * from a worker, for disks with remote layers, whose tables may have to be
 * read from the network; the connection's loop serves everyone else
 * meanwhile. */
#define BS_BATCH 128u

struct bs_job {
    struct conn *c;
    struct nreq *q;
    uint8_t *mem, *ha, *hd;     /* layout: [hdr a][id a][descs a] [hdr d][id d][descs d] */
    struct desc_list a, d;
    bool want_a, want_d;
    uint64_t off, end, t0;
    int err;
    bool issuing, answered;     /* the disk answered inside the call */
    int res;
    struct vd_extent e[BS_BATCH];
};

static void bs_reply(struct bs_job *j);

/* Add the batch's n extents; true when the answer is complete. */
static bool bs_take(struct bs_job *j, int n)
{
    if (n < 0) {
        j->err = n;
        return true;
    }
    for (int i = 0; i < n; i++) {
        const struct vd_extent *e = &j->e[i];
        uint64_t len = e->len;
        if (len == 0 || len > j->end - j->off)
            len = j->end - j->off;
        uint32_t af = ((e->flags & VD_EXT_DATA) ? 0 : NBD_STATE_HOLE) | ((e->flags & VD_EXT_ZERO) ? NBD_STATE_ZERO : 0);
        uint32_t df = (e->flags & VD_EXT_ALLOCATED) ? (uint32_t)e->depth + 1 : 0;
        uint64_t ac = j->a.covered, dc = j->d.covered;
        if (j->want_a)
            desc_add(&j->a, len, af);
        if (j->want_d)
            desc_add(&j->d, len, df);
        /* Stop once a list is full: what it covers is the answer. */
        if ((j->want_a && j->a.covered - ac < len) || (j->want_d && j->d.covered - dc < len))
            return true;
        j->off += len;
        if (j->a.max == 1 || j->off >= j->end)
            return true;
    }
    return false;
}

static void bs_answer(void *opaque, int n)
{
    struct bs_job *j = opaque;
    j->res = n;
    j->answered = true;
}

static void bs_later(void *opaque, int n);

/* Ask for batches until the answer is complete or one will come later. */
static void bs_issue(struct bs_job *j)
{
    for (;;) {
        /* no more extents than descriptors left: a local disk does no
         * more look-ups than it did one extent at a time */
        unsigned used = j->a.n > j->d.n ? j->a.n : j->d.n;
        unsigned want = j->a.max - used;
        if (want > BS_BATCH)
            want = BS_BATCH;
        j->issuing = true;
        j->answered = false;
        vd_disk_block_status_async(j->c->disk, j->off, j->end - j->off, j->e, want ? want : 1,
                                   bs_later, j);
        j->issuing = false;
        if (!j->answered)
            return;             /* bs_later carries on */
        if (bs_take(j, j->res)) {
            bs_reply(j);
            return;
        }
    }
}

static void bs_later(void *opaque, int n)
{
    struct bs_job *j = opaque;
    if (j->issuing) {
        bs_answer(j, n);
        return;
    }
    if (!bs_take(j, n)) {
        bs_issue(j);
        return;
    }
    struct conn *c = j->c;
    bs_reply(j);
    if (c->busy)
        c->again = true;
    else
        mark_dirty(c);
}

static void block_status(struct conn *c, struct nreq *q)
{
    unsigned max = (q->h.flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : VD_NBD_MAX_EXTENTS;
    struct bs_job *j = malloc(sizeof *j);
    uint8_t *mem = malloc(2 * (24 + 8 * (size_t)max));
    if (j)      /* the extents are written before they are read */
        memset(j, 0, offsetof(struct bs_job, e));
    if (!j || !mem) {
        free(j);
        free(mem);
        reply_error(c, q, NBD_ENOMEM, "out of memory");
        vd_export_stat(c->exp, VD_STAT_BLOCK_STATUS, 0, 0, -ENOMEM);
        enqueue(c, q);
        return;
    }
    j->c = c;
    j->q = q;
    j->t0 = vd_now_ns();
    j->mem = mem;
    j->ha = mem;
    j->hd = mem + 24 + 8 * (size_t)max;
    j->a = (struct desc_list){ .p = j->ha + 24, .max = max };
    j->d = (struct desc_list){ .p = j->hd + 24, .max = max };
    j->want_a = c->s.meta_alloc;
    j->want_d = c->s.meta_depth;
    j->off = q->h.off;
    j->end = q->h.off + q->h.len;
    c->pending_io++;
    bs_issue(j);
}

/* Build the reply from what the lists hold and queue it. */
static void bs_reply(struct bs_job *j)
{
    struct conn *c = j->c;
    struct nreq *q = j->q;
    c->pending_io--;
    vd_export_stat(c->exp, VD_STAT_BLOCK_STATUS, 0, vd_now_ns() - j->t0, 0);
    if (j->err < 0 && !j->a.n && !j->d.n) {
        reply_error(c, q, errno_to_nbd(j->err), vd_errmsg(j->err));
        free(j->mem);
        free(j);
        enqueue(c, q);
        return;
    }
    uint8_t *ha = j->ha, *hd = j->hd;
    q->ohdr = j->mem;
    q->oiov = q->small_iov;
    q->oiovcnt = 0;
    q->olen = 0;
    uint8_t *last = NULL;
    if (j->want_a) {
        hdr_chunk(ha, 0, NBD_REPLY_TYPE_BLOCK_STATUS, q->h.cookie, 4 + 8 * j->a.n);
        vd_be32(ha + 20, VD_NBD_META_ALLOCATION);
        q->small_iov[q->oiovcnt++] = (struct iovec){ ha, 24 + 8 * (size_t)j->a.n };
        q->olen += 24 + 8 * (size_t)j->a.n;
        last = ha;
    }
    if (j->want_d) {
        hdr_chunk(hd, 0, NBD_REPLY_TYPE_BLOCK_STATUS, q->h.cookie, 4 + 8 * j->d.n);
        vd_be32(hd + 20, VD_NBD_META_DEPTH);
        q->small_iov[q->oiovcnt++] = (struct iovec){ hd, 24 + 8 * (size_t)j->d.n };
        q->olen += 24 + 8 * (size_t)j->d.n;
        last = hd;
    }
    if (last)   /* a block status reply has at least one context */
        vd_be16(last + 4, NBD_REPLY_FLAG_DONE);
    free(j);
    enqueue(c, q);
}

/* ---- request lifecycle ---- */

static enum vd_stat_op stat_op(uint16_t type)
{
    switch (type) {
    case NBD_CMD_READ: return VD_STAT_READ;
    case NBD_CMD_WRITE: return VD_STAT_WRITE;
    case NBD_CMD_FLUSH: return VD_STAT_FLUSH;
    case NBD_CMD_TRIM: return VD_STAT_DISCARD;
    case NBD_CMD_WRITE_ZEROES: return VD_STAT_WRITE_ZEROES;
    case NBD_CMD_CACHE: return VD_STAT_CACHE;
    default: return VD_STAT_BLOCK_STATUS;
    }
}

static void req_done(struct vd_req *r, int res)
{
    struct nreq *q = r->opaque;
    struct conn *c = q->c;
    c->pending_io--;
    uint64_t bytes = q->h.type == NBD_CMD_FLUSH ? 0 : q->h.len;
    vd_export_stat(c->exp, stat_op(q->h.type), bytes, vd_now_ns() - q->t0, res);
    if (res < 0) {
        if (res != -ENOTSUP || q->h.type != NBD_CMD_WRITE_ZEROES)
            vd_log(VD_LOG_WARN, "%s: %s at offset %llu, %u bytes: %s", c->peer, vd_nbd_cmd_name(q->h.type),
                   (unsigned long long)q->h.off, q->h.len, vd_errmsg(res));
        reply_error(c, q, errno_to_nbd(res), vd_errmsg(res));
    } else if (q->h.type == NBD_CMD_READ) {
        reply_read(c, q);
    } else {
        reply_ok(c, q);
    }
    if (q->h.type == NBD_CMD_CACHE) {
        buf_put(q->buf, q->h.len);   /* read only to warm the cache */
        q->buf = NULL;
    }
    enqueue(c, q);
    if (c->busy)
        c->again = true;
    else
        mark_dirty(c);
}

static void submit(struct conn *c, struct nreq *q, enum vd_op op, unsigned flags, bool data)
{
    q->r.op = op;
    q->r.flags = flags;
    q->r.off = q->h.off;
    q->r.len = op == VD_OP_FLUSH ? 0 : q->h.len;
    if (data) {
        q->iov = (struct iovec){ q->buf, q->h.len };
        q->r.iov = &q->iov;
        q->r.iovcnt = 1;
    }
    q->r.done = req_done;
    q->r.opaque = q;
    c->pending_io++;
    vd_disk_submit(c->disk, &q->r);
}

/* A request whose header (and payload) has been read. */
static void start_request(struct conn *c, struct nreq *q)
{
    unsigned fua = (q->h.flags & NBD_CMD_FLAG_FUA) ? VD_REQ_FUA : 0;
    /* Zero-length requests have nothing to do; answer success. */
    if (q->h.len == 0 && q->h.type != NBD_CMD_FLUSH) {
        vd_export_stat(c->exp, stat_op(q->h.type), 0, vd_now_ns() - q->t0, 0);
        if (q->h.type == NBD_CMD_READ)
            reply_read(c, q);
        else
            reply_ok(c, q);
        enqueue(c, q);
        return;
    }
    switch (q->h.type) {
    case NBD_CMD_READ:
        submit(c, q, VD_OP_READ, 0, true);
        break;
    case NBD_CMD_WRITE:
        submit(c, q, VD_OP_WRITE, fua, true);
        break;
    case NBD_CMD_FLUSH:
        submit(c, q, VD_OP_FLUSH, 0, false);
        break;
    case NBD_CMD_TRIM:
        submit(c, q, VD_OP_DISCARD, fua, false);
        break;
    case NBD_CMD_WRITE_ZEROES: {
        unsigned f = fua;
        if (!(q->h.flags & NBD_CMD_FLAG_NO_HOLE))
            f |= VD_REQ_MAY_UNMAP;
        if (q->h.flags & NBD_CMD_FLAG_FAST_ZERO)
            f |= VD_REQ_FAST_ZERO;
        submit(c, q, VD_OP_WRITE_ZEROES, f, false);
        break;
    }
    case NBD_CMD_CACHE:
        submit(c, q, VD_OP_READ, 0, true);
        break;
    case NBD_CMD_BLOCK_STATUS:
        block_status(c, q);     /* replies (and queues q) itself, now or later */
        break;
    }
}

static bool throttled(struct conn *c)
{
    return c->inflight >= cfg.max_inflight ||
           (c->inflight && c->inflight_bytes >= VD_NBD_MAX_INFLIGHT_BYTES);
}

/* Parse one request header at c->in[in_pos]. Returns false when the
 * connection must stop reading. */
static bool take_header(struct conn *c)
{
    struct vd_nbd_request h;
    if (vd_nbd_request_parse(c->in + c->in_pos, &h) < 0) {
        vd_log(VD_LOG_WARN, "%s: bad request magic, closing the connection", c->peer);
        c->dead = true;
        return false;
    }
    c->in_pos += 28;
    c->requests++;
    if (h.type == NBD_CMD_DISC) {
        c->read_closed = true;
        return false;
    }
    struct nreq *q = calloc(1, sizeof *q);
    if (!q) {
        c->dead = true;
        return false;
    }
    q->c = c;
    q->h = h;
    q->t0 = vd_now_ns();
    c->inflight++;
    const char *why = NULL;
    uint32_t err = vd_nbd_request_check(&h, &c->s, &why);
    uint32_t payload = vd_nbd_request_payload(&h);
    if (!err && (h.type == NBD_CMD_READ || h.type == NBD_CMD_WRITE ||
                 (h.type == NBD_CMD_CACHE && h.len <= VD_NBD_MAX_BLOCK))) {
        if (h.len) {
            q->buf = buf_get(h.len);
            if (!q->buf) {
                err = NBD_ENOMEM;
                why = "out of memory";
            } else {
                q->cost = h.len;
                c->inflight_bytes += h.len;
            }
        }
    } else if (!err && h.type == NBD_CMD_CACHE) {
        /* Too large to warm through one buffer: the hint is ignored. */
        reply_ok(c, q);
        enqueue(c, q);
        return true;
    }
    if (err) {
        vd_log(VD_LOG_DEBUG, "%s: %s at %llu+%u refused: %s", c->peer, vd_nbd_cmd_name(h.type),
               (unsigned long long)h.off, h.len, why ? why : "");
        vd_export_stat(c->exp, stat_op(h.type), 0, 0, -EINVAL);
        reply_error(c, q, err, why);
        if (payload) {
            /* Answer after the payload: a client may not expect the reply
             * before it has finished sending the request. */
            c->discard = payload;
            c->discard_req = q;
        } else {
            enqueue(c, q);
        }
        return true;
    }
    if (payload) {
        c->rx = q;
        return true;
    }
    start_request(c, q);
    return true;
}

/* Use what is in the input buffer. */
static void process_xmit(struct conn *c)
{
    while (!c->dead && !c->read_closed) {
        size_t avail = c->in_len - c->in_pos;
        if (c->discard) {
            size_t n = avail < c->discard ? avail : (size_t)c->discard;
            c->in_pos += n;
            c->discard -= n;
            if (c->discard)
                return;
            if (c->discard_req) {
                enqueue(c, c->discard_req);
                c->discard_req = NULL;
            }
            continue;
        }
        if (c->rx) {
            struct nreq *q = c->rx;
            size_t n = q->h.len - q->got;
            if (n > avail)
                n = avail;
            memcpy(q->buf + q->got, c->in + c->in_pos, n);
            q->got += (uint32_t)n;
            c->in_pos += n;
            if (q->got < q->h.len)
                return;
            c->rx = NULL;
            start_request(c, q);
            continue;
        }
        if (avail < 28 || throttled(c))
            return;
        if (!take_header(c))
            return;
    }
}

static void enter_transmission(struct conn *c)
{
    struct vd_export *e = c->hs.export;
    c->hs.export = NULL;
    c->exp = e;
    c->disk = e->disk;
    c->s.size = c->hs.info.size;
    c->s.tflags = c->hs.info.tflags;
    c->s.structured = c->hs.structured;
    c->s.meta_alloc = c->hs.meta_alloc;
    c->s.meta_depth = c->hs.meta_depth;
    c->phase = P_XMIT;
    if (c->hs_timer) {
        vd_loop_cancel_timer(c->loop, c->hs_timer);
        c->hs_timer = 0;
    }
    vd_log(VD_LOG_INFO, "%s: connected to export '%s'%s%s", c->peer, e->name,
           c->ssl ? " over TLS" : "", c->s.structured ? " (structured replies)" : "");
}

static int start_tls(struct conn *c)
{
    if (c->in_pos != c->in_len) {
        vd_log(VD_LOG_WARN, "%s: data sent before the TLS handshake, closing", c->peer);
        return -EPROTO;
    }
    c->ssl = vd_nbd_tls_ssl(cfg.tls_ctx, c->rfd, c->wfd);
    if (!c->ssl)
        return -ENOMEM;
    c->stage = malloc(STAGE_CAP);
    if (!c->stage)
        return -ENOMEM;
    c->phase = P_TLS;
    return 0;
}

static void process_hs(struct conn *c)
{
    while (!c->dead && c->phase == P_HS && c->in_pos < c->in_len && c->hs.out.len < HS_OUT_MAX) {
        size_t used = 0;
        enum vd_nbd_hs_result r = vd_nbd_hs_input(&c->hs, c->in + c->in_pos, c->in_len - c->in_pos, &used);
        c->in_pos += used;
        switch (r) {
        case VD_NBD_HS_MORE:
            if (!used)
                return;
            break;
        case VD_NBD_HS_STARTTLS:
            /* The ACK goes out in the clear first; start_tls waits for that. */
            c->phase = P_TLS;
            break;
        case VD_NBD_HS_DONE:
            enter_transmission(c);
            break;
        case VD_NBD_HS_CLOSE:
            vd_log(VD_LOG_INFO, "%s: handshake ended: %s", c->peer,
                   c->hs.close_reason ? c->hs.close_reason : "closed");
            c->read_closed = true;
            return;
        }
    }
}

/* TLS handshake after NBD_OPT_STARTTLS's ACK has gone out. */
static void do_tls(struct conn *c)
{
    if (c->hs.out.len)
        return;
    if (!c->ssl && start_tls(c) < 0) {
        c->dead = true;
        return;
    }
    ERR_clear_error();
    int n = SSL_accept(c->ssl);
    c->tls_rd_wants_w = false;
    if (n == 1) {
        vd_nbd_hs_tls_done(&c->hs);
        c->phase = P_HS;
        vd_log(VD_LOG_DEBUG, "%s: TLS established (%s)", c->peer, SSL_get_version(c->ssl));
        return;
    }
    switch (SSL_get_error(c->ssl, n)) {
    case SSL_ERROR_WANT_READ:
        return;
    case SSL_ERROR_WANT_WRITE:
        c->tls_rd_wants_w = true;
        return;
    default: {
        char buf[160];
        ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
        vd_log(VD_LOG_WARN, "%s: TLS handshake failed: %s", c->peer, buf);
        c->dead = true;
    }
    }
}

/* The socket has nothing more to read. While draining, that is the end
 * of what the client sent before the export went away: read no more (a
 * WRITE whose payload is still incomplete is abandoned). */
static bool drained_input(struct conn *c)
{
    if (!c->draining)
        return false;
    c->read_closed = true;
    return true;
}

/* How much of want a read may take: while draining, no more than what the
 * socket held when the drain began, so that a client that keeps sending
 * cannot stretch the drain; 0 when that is all read. */
static size_t read_room(struct conn *c, size_t want)
{
    if (c->draining && c->drain_left >= 0 && want > (uint64_t)c->drain_left)
        return (size_t)c->drain_left;
    return want;
}

static void count_read(struct conn *c, ssize_t n)
{
    if (c->draining && c->drain_left >= 0)
        c->drain_left -= n;
}

/* Read and process input until blocked. Returns true on progress. */
static bool do_read(struct conn *c)
{
    bool moved = false;
    for (;;) {
        if (c->dead || c->read_closed)
            return moved;
        if (c->phase == P_TLS) {
            bool was = c->ssl && SSL_is_init_finished(c->ssl);
            do_tls(c);
            if (c->phase == P_TLS)
                return moved;
            (void)was;
            moved = true;
        }
        if (c->phase == P_HS)
            process_hs(c);
        else
            process_xmit(c);
        if (c->dead || c->read_closed || c->phase == P_TLS)
            continue;
        if (c->phase == P_HS && c->hs.out.len >= HS_OUT_MAX)
            return moved;
        if (c->phase == P_XMIT && !c->rx && !c->discard && throttled(c))
            return moved;
        /* Need more bytes. A large WRITE payload goes straight into its buffer. */
        ssize_t n;
        if (c->in_pos == c->in_len)
            c->in_pos = c->in_len = 0;
        if (c->rx && c->in_pos == c->in_len && c->rx->h.len - c->rx->got >= 65536) {
            struct nreq *q = c->rx;
            size_t want = read_room(c, q->h.len - q->got);
            if ((c->rd_idle && !c->ssl) || !want)
                return drained_input(c) || moved;
            n = xread(c, q->buf + q->got, want);
            if (n > 0) {
                count_read(c, n);
                q->got += (uint32_t)n;
                moved = true;
                if (q->got == q->h.len) {
                    c->rx = NULL;
                    start_request(c, q);
                }
                continue;
            }
        } else {
            if (c->in_pos && c->in_len == IN_CAP) {
                memmove(c->in, c->in + c->in_pos, c->in_len - c->in_pos);
                c->in_len -= c->in_pos;
                c->in_pos = 0;
            }
            if (c->in_len == IN_CAP)
                return moved;   /* cannot happen: requests are consumed */
            size_t want = read_room(c, IN_CAP - c->in_len);
            if ((c->rd_idle && !c->ssl) || !want)
                return drained_input(c) || moved;   /* nothing new since the last EAGAIN */
            n = xread(c, c->in + c->in_len, want);
            if (n > 0) {
                count_read(c, n);
                c->in_len += (size_t)n;
                moved = true;
                continue;
            }
        }
        if (n == -EAGAIN) {
            c->rd_idle = true;
            return drained_input(c) || moved;
        }
        if (n == 0)
            c->read_closed = true;
        else {
            vd_log(VD_LOG_DEBUG, "%s: read: %s", c->peer, strerror((int)-n));
            c->dead = true;
        }
        return true;
    }
}

static bool out_pending(struct conn *c)
{
    return c->hs.out.len || c->stage_len || c->oq;
}

/* Send what is queued until blocked. Returns true on progress. */
static bool do_write(struct conn *c)
{
    bool moved = false;
    if (c->dead)
        return false;
    while (out_pending(c)) {
        ssize_t n;
        if (c->hs.out.len) {
            struct iovec v = { c->hs.out.p, c->hs.out.len };
            n = xwritev(c, &v, 1);
            if (n > 0)
                vd_buf_consume(&c->hs.out, (size_t)n);
        } else if (c->oq) {
            struct iovec v[MAX_IOV];
            int cnt = 0;
            size_t skip = c->osent;
            for (struct nreq *q = c->oq; q && cnt < MAX_IOV; q = q->next) {
                for (int i = 0; i < q->oiovcnt && cnt < MAX_IOV; i++) {
                    struct iovec x = q->oiov[i];
                    if (skip >= x.iov_len) {
                        skip -= x.iov_len;
                        continue;
                    }
                    x.iov_base = (uint8_t *)x.iov_base + skip;
                    x.iov_len -= skip;
                    skip = 0;
                    if (x.iov_len)
                        v[cnt++] = x;
                }
            }
            n = cnt ? xwritev(c, v, cnt) : 0;
            size_t left = n > 0 ? (size_t)n : 0;
            /* Retire fully sent replies (including empty ones). */
            while (c->oq && left + c->osent >= c->oq->olen) {
                struct nreq *q = c->oq;
                left -= q->olen - c->osent;
                c->osent = 0;
                c->oq = q->next;
                if (!c->oq)
                    c->oq_tail = &c->oq;
                finish_sent(c, q);
                moved = true;
            }
            c->osent += left;
            if (cnt == 0)
                continue;
        } else {
            n = xwritev(c, NULL, 0);   /* flush the TLS stage */
            if (n == 0 && !c->stage_len)
                continue;
        }
        if (n < 0) {
            vd_log(VD_LOG_DEBUG, "%s: write: %s", c->peer, strerror((int)-n));
            c->dead = true;
            return true;
        }
        if (n == 0 && out_pending(c))
            return moved;
        moved = true;
    }
    return moved;
}

static void update_events(struct conn *c)
{
    bool want_in = !c->dead && !c->read_closed &&
                   !(c->phase == P_XMIT && !c->rx && !c->discard && throttled(c)) &&
                   !(c->phase == P_TLS && c->hs.out.len);
    bool want_out = !c->dead && out_pending(c);
    if (c->ssl) {
        want_in |= c->tls_wr_wants_r && !c->dead;
        want_out |= c->tls_rd_wants_w && !c->dead;
    }
    uint32_t r = want_in ? EPOLLIN : 0, w = want_out ? EPOLLOUT : 0;
    if (c->rfd == c->wfd) {
        if (r != c->ev_r || w != c->ev_w) {
            vd_loop_mod_fd(c->loop, c->rfd, r | w);
            c->ev_r = r;
            c->ev_w = w;
        }
        return;
    }
    if (r != c->ev_r) {
        vd_loop_mod_fd(c->loop, c->rfd, r);
        c->ev_r = r;
    }
    if (w != c->ev_w) {
        vd_loop_mod_fd(c->loop, c->wfd, w);
        c->ev_w = w;
    }
}

static void destroy(struct conn *c)
{
    undirty(c);
    if (c->hs_timer)
        vd_loop_cancel_timer(c->loop, c->hs_timer);
    if (c->drain_timer)
        vd_loop_cancel_timer(c->loop, c->drain_timer);
    vd_loop_del_fd(c->loop, c->rfd);
    if (c->wfd != c->rfd)
        vd_loop_del_fd(c->loop, c->wfd);
    if (c->ssl) {
        if (!c->dead)
            SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
    }
    close(c->rfd);
    if (c->wfd != c->rfd)
        close(c->wfd);
    while (c->oq) {
        struct nreq *q = c->oq;
        c->oq = q->next;
        finish_sent(c, q);
    }
    if (c->rx) {
        finish_sent(c, c->rx);
        c->rx = NULL;
    }
    if (c->discard_req) {
        finish_sent(c, c->discard_req);
        c->discard_req = NULL;
    }
    vd_log(VD_LOG_INFO, "%s: disconnected after %llu requests", c->peer, (unsigned long long)c->requests);
    if (c->exp)
        vd_export_put(c->exp);
    vd_nbd_hs_free(&c->hs);
    free(c->stage);
    free(c->in);
    unsigned left = reg_del(c);
    free(c);
    if (left == 0 && cfg.on_idle)
        cfg.on_idle(cfg.on_idle_opaque);
}

static void progress(struct conn *c)
{
    if (c->busy) {
        c->again = true;
        return;
    }
    c->busy = true;
    do {
        c->again = false;
        bool w = do_write(c);
        bool r = do_read(c);
        if (w || r)
            c->again = true;
    } while (c->again && !c->dead);
    c->busy = false;
    /* Done when nothing is inside the disk and either the connection is
     * broken or the client is gone and has had all its replies. */
    if (c->pending_io == 0 &&
        (c->dead || (c->read_closed && !out_pending(c) && (!c->rx || c->draining)))) {
        destroy(c);
        return;
    }
    update_events(c);
}

static void on_event(struct vd_loop *loop, int fd, uint32_t events, void *opaque)
{
    struct conn *c = opaque;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        c->rd_idle = false;
    if ((events & (EPOLLHUP | EPOLLERR)) && !(events & EPOLLIN)) {
        /* The peer is gone and there is nothing left to read. */
        c->dead = true;
    }
    progress(c);
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void hs_timeout(void *opaque)
{
    struct conn *c = opaque;
    c->hs_timer = 0;
    if (c->phase == P_XMIT)
        return;
    vd_log(VD_LOG_INFO, "%s: no export chosen within %u s, closing", c->peer, cfg.handshake_seconds);
    c->dead = true;
    progress(c);
}

/* The loop threads that serve connections run as SCHED_BATCH (same nice
 * value, no wake-up preemption). A client on the same host sends one
 * request per reply it takes; with wake-up preemption each send makes the
 * scheduler switch to this thread at once when the two share a CPU (the
 * 2-vCPU guests here pack them most of the time), so the loop wakes,
 * serves one or two requests and sleeps again, and the pair pays a
 * context switch every few requests. A batch thread waits until the
 * client blocks and then serves everything it sent. On an idle CPU it
 * still runs at once, so when the two run apart nothing changes. Only a
 * thread still at the default policy is changed; VDISK_NBD_SCHED_BATCH=0
 * keeps it. See bench/RESULTS.md (NBD, per-request cost). */
static __thread bool batch_done;

static void loop_thread_batch(void)
{
    if (batch_done)
        return;
    batch_done = true;
    const char *e = getenv("VDISK_NBD_SCHED_BATCH");
    if (e && !strcmp(e, "0"))
        return;
    if (sched_getscheduler(0) != SCHED_OTHER)
        return;
    struct sched_param sp = { .sched_priority = 0 };
    if (sched_setscheduler(0, SCHED_BATCH, &sp) < 0)
        vd_log(VD_LOG_DEBUG, "SCHED_BATCH for the NBD loop thread: %s", strerror(errno));
}

void vd_nbd_serve(struct vd_loop *loop, int rfd, int wfd, const char *peer)
{
    struct conn *c = calloc(1, sizeof *c);
    if (c)
        c->in = malloc(IN_CAP);
    if (!c || !c->in) {
        free(c);
        close(rfd);
        if (wfd != rfd)
            close(wfd);
        return;
    }
    c->loop = loop;
    c->rfd = rfd;
    c->wfd = wfd;
    /* A client waits for each reply before it sends more: poll for the
     * completions instead of sleeping (see loop.c; bench/RESULTS.md). */
    vd_loop_enable_poll(loop);
    /* Reads the page cache holds are done on the loop, without io_uring
     * (see loop.c; bench/RESULTS.md, NBD per-request cost). */
    vd_loop_enable_inline_reads(loop);
    loop_thread_batch();
    snprintf(c->peer, sizeof c->peer, "%s", peer ? peer : "client");
    c->oq_tail = &c->oq;
    set_nonblock(rfd);
    set_nonblock(wfd);
    /* Room for a few large replies in the socket: fewer wake-ups per
     * 1 MiB+ read (capped by net.core.wmem_max; failure is harmless). */
    int sndbuf = 4 << 20;
    setsockopt(wfd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    vd_nbd_hs_init(&c->hs, &hs_ops, c, cfg.tls_ctx ? cfg.tls : VD_NBD_TLS_OFF);
    reg_add(c);
    c->ev_r = EPOLLIN;
    c->ev_w = c->rfd == c->wfd ? EPOLLOUT : 0;
    if (vd_loop_add_fd(loop, rfd, c->ev_r | (c->rfd == c->wfd ? c->ev_w : 0), on_event, c) < 0 ||
        (wfd != rfd && vd_loop_add_fd(loop, wfd, 0, on_event, c) < 0)) {
        vd_log(VD_LOG_ERROR, "%s: cannot watch the connection", c->peer);
        c->dead = true;
    }
    vd_log(VD_LOG_DEBUG, "%s: new connection", c->peer);
    c->hs_timer = vd_loop_timer(loop, cfg.handshake_seconds * 1000ull, hs_timeout, c);
    progress(c);
}

/* ---- stopping connections ---- */

static void drain_timeout(void *opaque)
{
    struct conn *c = opaque;
    c->drain_timer = 0;
    vd_log(VD_LOG_WARN, "%s: replies still unsent after %u s of draining, closing", c->peer,
           cfg.drain_seconds);
    c->dead = true;
    progress(c);
}

struct kill_job {
    struct vd_loop *loop;
    struct vd_export *exp;   /* NULL: every connection */
};

static void kill_on_loop(void *opaque)
{
    struct kill_job *k = opaque;
    struct conn **v = NULL;
    size_t n = 0, cap = 0;
    pthread_mutex_lock(&reg_lock);
    for (struct conn *c = conns; c; c = c->lnext) {
        if (c->loop != k->loop || (k->exp && c->exp != k->exp))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            struct conn **nv = realloc(v, cap * sizeof *v);
            if (!nv)
                break;
            v = nv;
        }
        v[n++] = c;
    }
    pthread_mutex_unlock(&reg_lock);
    /* Connections of this loop are only freed on this thread: safe to use.
     * The export (or the daemon) is going. A connection in transmission
     * drains: the requests the client has already sent (whatever the socket
     * holds now) run, every reply is sent, then it closes; a client that
     * does not read its replies is cut off after cfg.drain_seconds. One
     * still in the handshake has nothing to finish and closes at once. */
    for (size_t i = 0; i < n; i++) {
        struct conn *c = v[i];
        if (c->draining || c->dead)
            continue;
        if (c->phase != P_XMIT) {
            c->read_closed = true;
            c->dead = true;
        } else {
            c->draining = true;
            c->rd_idle = false;     /* look at the socket once more */
            /* What the client has sent so far is what gets served. */
            int avail = 0;
            c->drain_left = -1;
            if (!c->ssl && ioctl(c->rfd, FIONREAD, &avail) == 0 && avail >= 0)
                c->drain_left = avail;
            c->drain_timer = vd_loop_timer(c->loop, cfg.drain_seconds * 1000ull, drain_timeout, c);
        }
        progress(c);
    }
    free(v);
    if (k->exp)
        vd_export_put(k->exp);
    free(k);
}

static void kill_everywhere(struct vd_export *e)
{
    pthread_mutex_lock(&reg_lock);
    struct vd_loop *ls[MAX_LOOPS];
    unsigned n = nloops;
    memcpy(ls, loops, n * sizeof *ls);
    pthread_mutex_unlock(&reg_lock);
    for (unsigned i = 0; i < n; i++) {
        struct kill_job *k = malloc(sizeof *k);
        if (!k)
            continue;
        k->loop = ls[i];
        k->exp = e;
        if (e)
            vd_export_ref(e);
        vd_loop_post(ls[i], kill_on_loop, k);
    }
}

void vd_nbd_close_all(void)
{
    kill_everywhere(NULL);
    /* Wait until every connection has drained: each is closed by its own
     * drain timer at the latest; the extra time is for the disk to finish
     * requests already inside it (a hung device still does not hang us). */
    uint64_t limit = (cfg.drain_seconds + 25) * 1000ull;
    for (uint64_t i = 0; i < limit && vd_nbd_connections(); i++)
        usleep(1000);
}

/* ---- the "nbd" export type ---- */

static int nbd_start(struct vd_export *e)
{
    return 0;
}

static void nbd_stop(struct vd_export *e)
{
    kill_everywhere(e);
}

struct count_ctx { struct vd_export *e; unsigned n; };

static void nbd_stats(struct vd_export *e, json_t *out)
{
    unsigned n = 0;
    pthread_mutex_lock(&reg_lock);
    for (struct conn *c = conns; c; c = c->lnext)
        if (c->exp == e)
            n++;
    pthread_mutex_unlock(&reg_lock);
    json_object_set_new(out, "connections", json_integer(n));
}

static const struct vd_export_type nbd_type = {
    .name = "nbd",
    .start = nbd_start,
    .stop = nbd_stop,
    .stats = nbd_stats,
};

__attribute__((constructor)) static void register_nbd_type(void)
{
    vd_export_type_register(&nbd_type);
}
