/* NBD fixed-newstyle handshake and option haggling as a pure state machine
 * over bytes: input is fed in, replies accumulate in hs->out. No I/O here,
 * so the connection code, the fuzzer and tests share one parser. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nbd/nbd_proto.h"
#include "nbd/nbd_server.h"

enum { S_CLIENT_FLAGS, S_OPT_HDR, S_OPT_DATA, S_OPT_SKIP, S_TLS_WAIT, S_DONE, S_DEAD };

int vd_buf_put(struct vd_buf *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len)
            cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p)
            return -ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    if (len)
        memcpy(b->p + b->len, data, len);
    b->len += len;
    return 0;
}

void vd_buf_consume(struct vd_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

void vd_buf_free(struct vd_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static void put16(struct vd_buf *b, uint16_t v) { uint8_t x[2]; vd_be16(x, v); vd_buf_put(b, x, 2); }
static void put32(struct vd_buf *b, uint32_t v) { uint8_t x[4]; vd_be32(x, v); vd_buf_put(b, x, 4); }
static void put64(struct vd_buf *b, uint64_t v) { uint8_t x[8]; vd_be64(x, v); vd_buf_put(b, x, 8); }

/* An option reply header followed by len bytes of data the caller adds. */
static void reply_hdr(struct vd_nbd_hs *hs, uint32_t type, uint32_t len)
{
    put64(&hs->out, NBD_REP_MAGIC);
    put32(&hs->out, hs->opt);
    put32(&hs->out, type);
    put32(&hs->out, len);
}

static void reply_ack(struct vd_nbd_hs *hs) { reply_hdr(hs, NBD_REP_ACK, 0); }

static void reply_err(struct vd_nbd_hs *hs, uint32_t err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reply_err(struct vd_nbd_hs *hs, uint32_t err, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    reply_hdr(hs, err, (uint32_t)n);
    vd_buf_put(&hs->out, msg, (size_t)n);
}

void vd_nbd_hs_init(struct vd_nbd_hs *hs, const struct vd_nbd_hs_ops *ops, void *opaque,
                    enum vd_nbd_tls tls)
{
    memset(hs, 0, sizeof *hs);
    hs->ops = ops;
    hs->opaque = opaque;
    hs->tls = tls;
    hs->state = S_CLIENT_FLAGS;
    put64(&hs->out, NBD_MAGIC);
    put64(&hs->out, NBD_IHAVEOPT);
    put16(&hs->out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
}

static void drop_export(struct vd_nbd_hs *hs)
{
    if (hs->export && hs->ops->close)
        hs->ops->close(hs->opaque, hs->export);
    hs->export = NULL;
}

void vd_nbd_hs_free(struct vd_nbd_hs *hs)
{
    drop_export(hs);
    free(hs->data);
    free(hs->meta_export);
    vd_buf_free(&hs->out);
    hs->data = NULL;
    hs->meta_export = NULL;
}

static void forget_negotiation(struct vd_nbd_hs *hs)
{
    hs->structured = false;
    hs->meta_alloc = hs->meta_depth = false;
    free(hs->meta_export);
    hs->meta_export = NULL;
}

void vd_nbd_hs_tls_done(struct vd_nbd_hs *hs)
{
    /* Whatever was negotiated in the clear does not carry over. */
    forget_negotiation(hs);
    hs->tls_active = true;
    hs->state = S_OPT_HDR;
    hs->hdr_got = 0;
}

/* Reads a length-prefixed string (u32 length) at *pos of the option data. */
static int get_string(struct vd_nbd_hs *hs, size_t *pos, char **out)
{
    if (hs->optlen - *pos < 4)
        return -EINVAL;
    uint32_t n = vd_rd32(hs->data + *pos);
    *pos += 4;
    if (n > VD_NBD_MAX_NAME || hs->optlen - *pos < n)
        return -EINVAL;
    char *s = malloc(n + 1);
    if (!s)
        return -ENOMEM;
    memcpy(s, hs->data + *pos, n);
    s[n] = 0;
    *pos += n;
    if (strlen(s) != n) {   /* embedded NUL */
        free(s);
        return -EINVAL;
    }
    *out = s;
    return 0;
}

static bool tls_blocks(struct vd_nbd_hs *hs)
{
    return hs->tls == VD_NBD_TLS_REQUIRE && !hs->tls_active;
}

/* ---- NBD_OPT_INFO / NBD_OPT_GO ---- */

static void info_reply(struct vd_nbd_hs *hs, uint16_t type, const void *data, size_t len)
{
    reply_hdr(hs, NBD_REP_INFO, (uint32_t)(2 + len));
    put16(&hs->out, type);
    vd_buf_put(&hs->out, data, len);
}

static enum vd_nbd_hs_result opt_info_go(struct vd_nbd_hs *hs)
{
    size_t pos = 0;
    char *name = NULL;
    if (tls_blocks(hs)) {
        reply_err(hs, NBD_REP_ERR_TLS_REQD, "TLS is required before this option");
        return VD_NBD_HS_MORE;
    }
    int r = get_string(hs, &pos, &name);
    if (r < 0 || hs->optlen - pos < 2) {
        free(name);
        reply_err(hs, NBD_REP_ERR_INVALID, "malformed %s option", hs->opt == NBD_OPT_GO ? "GO" : "INFO");
        return VD_NBD_HS_MORE;
    }
    uint16_t nreq = vd_rd16(hs->data + pos);
    pos += 2;
    if (hs->optlen - pos != 2u * nreq) {
        free(name);
        reply_err(hs, NBD_REP_ERR_INVALID, "option length does not match %u information requests", nreq);
        return VD_NBD_HS_MORE;
    }
    bool want_name = false, want_desc = false, want_bs = false;
    for (unsigned i = 0; i < nreq; i++) {
        uint16_t t = vd_rd16(hs->data + pos + 2 * i);
        want_name |= t == NBD_INFO_NAME;
        want_desc |= t == NBD_INFO_DESCRIPTION;
        want_bs |= t == NBD_INFO_BLOCK_SIZE;
    }
    struct vd_nbd_export_info info = {0};
    void *h = hs->ops->open(hs->opaque, name, &info);
    if (!h) {
        reply_err(hs, NBD_REP_ERR_UNKNOWN, "no export named '%s'", name);
        free(name);
        return VD_NBD_HS_MORE;
    }
    if (!hs->structured)
        info.tflags &= ~NBD_FLAG_SEND_DF;
    if (want_name && info.name)
        info_reply(hs, NBD_INFO_NAME, info.name, strlen(info.name));
    if (want_desc && info.description)
        info_reply(hs, NBD_INFO_DESCRIPTION, info.description, strlen(info.description));
    if (want_bs) {
        uint8_t bs[12];
        vd_be32(bs, VD_NBD_MIN_BLOCK);
        vd_be32(bs + 4, VD_NBD_PREF_BLOCK);
        vd_be32(bs + 8, VD_NBD_MAX_BLOCK);
        info_reply(hs, NBD_INFO_BLOCK_SIZE, bs, sizeof bs);
    }
    uint8_t ex[10];
    vd_be64(ex, info.size);
    vd_be16(ex + 8, info.tflags);
    info_reply(hs, NBD_INFO_EXPORT, ex, sizeof ex);
    reply_ack(hs);
    if (hs->opt == NBD_OPT_INFO) {
        hs->ops->close(hs->opaque, h);
        free(name);
        return VD_NBD_HS_MORE;
    }
    /* Contexts chosen for another export name do not apply to this one. */
    if (!hs->meta_export || strcmp(hs->meta_export, name) != 0)
        hs->meta_alloc = hs->meta_depth = false;
    free(name);
    drop_export(hs);
    hs->export = h;
    hs->info = info;
    hs->state = S_DONE;
    return VD_NBD_HS_DONE;
}

static enum vd_nbd_hs_result opt_export_name(struct vd_nbd_hs *hs)
{
    if (tls_blocks(hs)) {
        hs->close_reason = "NBD_OPT_EXPORT_NAME before TLS";
        return VD_NBD_HS_CLOSE;
    }
    if (hs->optlen > VD_NBD_MAX_NAME || memchr(hs->data, 0, hs->optlen)) {
        hs->close_reason = "invalid export name";
        return VD_NBD_HS_CLOSE;
    }
    char *name = strndup((const char *)hs->data, hs->optlen);
    if (!name) {
        hs->close_reason = "out of memory";
        return VD_NBD_HS_CLOSE;
    }
    struct vd_nbd_export_info info = {0};
    void *h = hs->ops->open(hs->opaque, name, &info);
    free(name);
    if (!h) {
        /* This option has no way to report an error but closing. */
        hs->close_reason = "NBD_OPT_EXPORT_NAME for an unknown export";
        return VD_NBD_HS_CLOSE;
    }
    if (!hs->structured)
        info.tflags &= ~NBD_FLAG_SEND_DF;
    put64(&hs->out, info.size);
    put16(&hs->out, info.tflags);
    if (!(hs->client_flags & NBD_FLAG_C_NO_ZEROES)) {
        static const uint8_t zeroes[124];
        vd_buf_put(&hs->out, zeroes, sizeof zeroes);
    }
    /* No SET_META_CONTEXT name check is possible here; honour what was set
     * only when it named this export. */
    if (!hs->meta_export || !info.name || strcmp(hs->meta_export, info.name) != 0)
        hs->meta_alloc = hs->meta_depth = false;
    drop_export(hs);
    hs->export = h;
    hs->info = info;
    hs->state = S_DONE;
    return VD_NBD_HS_DONE;
}

static void emit_server(void *ctx, const char *name, const char *desc)
{
    struct vd_nbd_hs *hs = ctx;
    size_t n = strlen(name), d = desc ? strlen(desc) : 0;
    if (n > VD_NBD_MAX_NAME || d > VD_NBD_MAX_NAME)
        return;
    reply_hdr(hs, NBD_REP_SERVER, (uint32_t)(4 + n + d));
    put32(&hs->out, (uint32_t)n);
    vd_buf_put(&hs->out, name, n);
    vd_buf_put(&hs->out, desc, d);
}

/* ---- meta contexts ---- */

static void meta_reply(struct vd_nbd_hs *hs, uint32_t id, const char *name)
{
    size_t n = strlen(name);
    reply_hdr(hs, NBD_REP_META_CONTEXT, (uint32_t)(4 + n));
    put32(&hs->out, id);
    vd_buf_put(&hs->out, name, n);
}

static enum vd_nbd_hs_result opt_meta(struct vd_nbd_hs *hs)
{
    bool set = hs->opt == NBD_OPT_SET_META_CONTEXT;
    if (tls_blocks(hs)) {
        reply_err(hs, NBD_REP_ERR_TLS_REQD, "TLS is required before this option");
        return VD_NBD_HS_MORE;
    }
    if (!hs->structured) {
        reply_err(hs, NBD_REP_ERR_INVALID, "structured replies must be negotiated first");
        return VD_NBD_HS_MORE;
    }
    size_t pos = 0;
    char *name = NULL;
    if (get_string(hs, &pos, &name) < 0 || hs->optlen - pos < 4) {
        free(name);
        reply_err(hs, NBD_REP_ERR_INVALID, "malformed meta context option");
        return VD_NBD_HS_MORE;
    }
    uint32_t nq = vd_rd32(hs->data + pos);
    pos += 4;
    /* Parse every query before answering, so a malformed one changes nothing. */
    bool alloc = false, depth = false;
    if (nq == 0 && !set)
        alloc = depth = true;
    for (uint32_t i = 0; i < nq; i++) {
        char *q = NULL;
        if (get_string(hs, &pos, &q) < 0) {
            free(name);
            reply_err(hs, NBD_REP_ERR_INVALID, "malformed meta context query %u", i);
            return VD_NBD_HS_MORE;
        }
        if (!strcmp(q, "base:allocation") || (!set && !strcmp(q, "base:")))
            alloc = true;
        else if (!strcmp(q, "qemu:allocation-depth") || (!set && !strcmp(q, "qemu:")))
            depth = true;
        free(q);
    }
    if (pos != hs->optlen) {
        free(name);
        reply_err(hs, NBD_REP_ERR_INVALID, "trailing bytes after meta context queries");
        return VD_NBD_HS_MORE;
    }
    struct vd_nbd_export_info info;
    void *h = hs->ops->open(hs->opaque, name, &info);
    if (!h) {
        reply_err(hs, NBD_REP_ERR_UNKNOWN, "no export named '%s'", name);
        free(name);
        return VD_NBD_HS_MORE;
    }
    hs->ops->close(hs->opaque, h);
    if (alloc)
        meta_reply(hs, set ? VD_NBD_META_ALLOCATION : 0, "base:allocation");
    if (depth)
        meta_reply(hs, set ? VD_NBD_META_DEPTH : 0, "qemu:allocation-depth");
    reply_ack(hs);
    if (set) {
        hs->meta_alloc = alloc;
        hs->meta_depth = depth;
        free(hs->meta_export);
        hs->meta_export = name;
    } else {
        free(name);
    }
    return VD_NBD_HS_MORE;
}

/* One complete option (header + data in hs->data). */
static enum vd_nbd_hs_result run_option(struct vd_nbd_hs *hs)
{
    switch (hs->opt) {
    case NBD_OPT_EXPORT_NAME:
        return opt_export_name(hs);
    case NBD_OPT_ABORT:
        reply_ack(hs);
        hs->close_reason = "client aborted";
        return VD_NBD_HS_CLOSE;
    case NBD_OPT_LIST:
        if (tls_blocks(hs))
            reply_err(hs, NBD_REP_ERR_TLS_REQD, "TLS is required before this option");
        else if (hs->optlen)
            reply_err(hs, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        else {
            hs->ops->list(hs->opaque, emit_server, hs);
            reply_ack(hs);
        }
        return VD_NBD_HS_MORE;
    case NBD_OPT_STARTTLS:
        if (hs->optlen)
            reply_err(hs, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        else if (hs->tls == VD_NBD_TLS_OFF)
            reply_err(hs, NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
        else if (hs->tls_active)
            reply_err(hs, NBD_REP_ERR_INVALID, "TLS is already active");
        else {
            reply_ack(hs);
            hs->state = S_TLS_WAIT;
            return VD_NBD_HS_STARTTLS;
        }
        return VD_NBD_HS_MORE;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        return opt_info_go(hs);
    case NBD_OPT_STRUCTURED_REPLY:
        if (tls_blocks(hs))
            reply_err(hs, NBD_REP_ERR_TLS_REQD, "TLS is required before this option");
        else if (hs->optlen)
            reply_err(hs, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
        else {
            hs->structured = true;
            reply_ack(hs);
        }
        return VD_NBD_HS_MORE;
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
        return opt_meta(hs);
    default:
        if (tls_blocks(hs))
            reply_err(hs, NBD_REP_ERR_TLS_REQD, "TLS is required before this option");
        else
            reply_err(hs, NBD_REP_ERR_UNSUP, "option %u is not supported", hs->opt);
        return VD_NBD_HS_MORE;
    }
}

enum vd_nbd_hs_result vd_nbd_hs_input(struct vd_nbd_hs *hs, const uint8_t *buf, size_t len,
                                      size_t *used)
{
    size_t pos = 0;
    enum vd_nbd_hs_result res = VD_NBD_HS_MORE;
    while (res == VD_NBD_HS_MORE && pos < len) {
        switch (hs->state) {
        case S_CLIENT_FLAGS:
        case S_OPT_HDR: {
            size_t need = (hs->state == S_CLIENT_FLAGS ? 4 : 16) - hs->hdr_got;
            size_t n = len - pos < need ? len - pos : need;
            memcpy(hs->hdr + hs->hdr_got, buf + pos, n);
            hs->hdr_got += n;
            pos += n;
            if (n < need)
                break;
            hs->hdr_got = 0;
            if (hs->state == S_CLIENT_FLAGS) {
                hs->client_flags = vd_rd32(hs->hdr);
                if (hs->client_flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
                    hs->close_reason = "unknown client flags";
                    hs->state = S_DEAD;
                    res = VD_NBD_HS_CLOSE;
                    break;
                }
                hs->state = S_OPT_HDR;
                break;
            }
            if (vd_rd64(hs->hdr) != NBD_IHAVEOPT) {
                hs->close_reason = "bad option magic";
                hs->state = S_DEAD;
                res = VD_NBD_HS_CLOSE;
                break;
            }
            hs->opt = vd_rd32(hs->hdr + 8);
            hs->optlen = vd_rd32(hs->hdr + 12);
            if (hs->optlen > VD_NBD_MAX_OPTLEN) {
                if (hs->opt == NBD_OPT_EXPORT_NAME) {
                    hs->close_reason = "oversized NBD_OPT_EXPORT_NAME";
                    hs->state = S_DEAD;
                    res = VD_NBD_HS_CLOSE;
                    break;
                }
                /* Drop the data without holding it; answer once it is gone. */
                hs->skip = hs->optlen;
                hs->state = S_OPT_SKIP;
                break;
            }
            free(hs->data);
            hs->data = malloc(hs->optlen ? hs->optlen : 1);
            if (!hs->data) {
                hs->close_reason = "out of memory";
                hs->state = S_DEAD;
                res = VD_NBD_HS_CLOSE;
                break;
            }
            hs->data_got = 0;
            hs->state = S_OPT_DATA;
            if (hs->optlen == 0)
                goto complete;
            break;
        }
        case S_OPT_DATA: {
            size_t need = hs->optlen - hs->data_got;
            size_t n = len - pos < need ? len - pos : need;
            memcpy(hs->data + hs->data_got, buf + pos, n);
            hs->data_got += n;
            pos += n;
            if (hs->data_got < hs->optlen)
                break;
        complete:
            hs->state = S_OPT_HDR;
            res = run_option(hs);
            free(hs->data);
            hs->data = NULL;
            if (res == VD_NBD_HS_CLOSE)
                hs->state = S_DEAD;
            break;
        }
        case S_OPT_SKIP: {
            uint64_t n = len - pos < hs->skip ? len - pos : hs->skip;
            pos += n;
            hs->skip -= n;
            if (hs->skip == 0) {
                hs->state = S_OPT_HDR;
                reply_err(hs, NBD_REP_ERR_TOO_BIG, "option data of %u bytes exceeds the limit of %u",
                          hs->optlen, VD_NBD_MAX_OPTLEN);
            }
            break;
        }
        default:   /* S_TLS_WAIT, S_DONE, S_DEAD: nothing more belongs to us */
            *used = pos;
            return hs->state == S_DEAD ? VD_NBD_HS_CLOSE : VD_NBD_HS_MORE;
        }
    }
    *used = pos;
    return res;
}
