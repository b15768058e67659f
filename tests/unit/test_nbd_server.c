/* The NBD server's byte-level parsers: the handshake state machine
 * (nbd/handshake.c) and request checks (nbd/request.c), driven with
 * hand-built client bytes and a fake export table. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "nbd/nbd_proto.h"
#include "nbd/nbd_server.h"

static int open_handles;

static void *f_open(void *opaque, const char *name, struct vd_nbd_export_info *info)
{
    if (strcmp(name, "disk") && strcmp(name, ""))
        return NULL;
    info->size = 1 << 20;
    info->tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_DF | NBD_FLAG_SEND_TRIM;
    info->name = "disk";
    info->description = "test";
    open_handles++;
    return (void *)1;
}

static void f_close(void *opaque, void *h) { open_handles--; }

static void f_list(void *opaque, void (*emit)(void *, const char *, const char *), void *ctx)
{
    emit(ctx, "disk", NULL);
}

static const struct vd_nbd_hs_ops ops = { f_open, f_close, f_list };

struct bytes { uint8_t b[70000]; size_t n; };
static void put32(struct bytes *x, uint32_t v) { vd_be32(x->b + x->n, v); x->n += 4; }
static void putopt(struct bytes *x, uint32_t opt, const void *data, uint32_t len)
{
    vd_be64(x->b + x->n, NBD_IHAVEOPT);
    x->n += 8;
    put32(x, opt);
    put32(x, len);
    if (len)
        memcpy(x->b + x->n, data, len);
    x->n += len;
}

/* Reply n (0-based) in hs->out after the 18-byte greeting: its type. */
static uint32_t reply_type(struct vd_nbd_hs *hs, int n, uint32_t *len_out)
{
    size_t pos = 18;
    for (;;) {
        assert_true(pos + 20 <= hs->out.len);
        assert_int_equal(vd_rd64(hs->out.p + pos), NBD_REP_MAGIC);
        uint32_t type = vd_rd32(hs->out.p + pos + 12), len = vd_rd32(hs->out.p + pos + 16);
        if (n-- == 0) {
            if (len_out)
                *len_out = len;
            return type;
        }
        pos += 20 + len;
    }
}

static void test_greeting(void **state)
{
    struct vd_nbd_hs hs;
    vd_nbd_hs_init(&hs, &ops, NULL, VD_NBD_TLS_OFF);
    assert_int_equal(hs.out.len, 18);
    assert_int_equal(vd_rd64(hs.out.p), NBD_MAGIC);
    assert_int_equal(vd_rd64(hs.out.p + 8), NBD_IHAVEOPT);
    assert_int_equal(vd_rd16(hs.out.p + 16), NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    vd_nbd_hs_free(&hs);
}

static void test_go_byte_by_byte(void **state)
{
    struct bytes x = { .n = 0 };
    put32(&x, NBD_FLAG_C_FIXED_NEWSTYLE);
    putopt(&x, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
    uint8_t go[4 + 4 + 2 + 2];
    vd_be32(go, 4);
    memcpy(go + 4, "disk", 4);
    vd_be16(go + 8, 1);
    vd_be16(go + 10, NBD_INFO_BLOCK_SIZE);
    putopt(&x, NBD_OPT_GO, go, sizeof go);
    x.b[x.n++] = 0xAA;   /* the first byte of transmission: not ours */
    struct vd_nbd_hs hs;
    vd_nbd_hs_init(&hs, &ops, NULL, VD_NBD_TLS_OFF);
    enum vd_nbd_hs_result r = VD_NBD_HS_MORE;
    size_t i;
    for (i = 0; i < x.n && r == VD_NBD_HS_MORE; i++) {
        size_t used;
        r = vd_nbd_hs_input(&hs, x.b + i, 1, &used);
        assert_int_equal(used, 1);
    }
    assert_int_equal(r, VD_NBD_HS_DONE);
    assert_int_equal(i, x.n - 1);
    assert_true(hs.structured);
    assert_int_equal(hs.info.size, 1 << 20);
    assert_true(hs.info.tflags & NBD_FLAG_SEND_DF);
    assert_int_equal(reply_type(&hs, 0, NULL), NBD_REP_ACK);          /* structured reply */
    uint32_t len;
    assert_int_equal(reply_type(&hs, 1, &len), NBD_REP_INFO);         /* block size */
    assert_int_equal(len, 14);
    assert_int_equal(reply_type(&hs, 2, &len), NBD_REP_INFO);         /* export */
    assert_int_equal(len, 12);
    assert_int_equal(reply_type(&hs, 3, NULL), NBD_REP_ACK);
    assert_int_equal(open_handles, 1);
    vd_nbd_hs_free(&hs);
    assert_int_equal(open_handles, 0);
}

static void test_export_name_no_zeroes(void **state)
{
    struct bytes x = { .n = 0 };
    put32(&x, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    putopt(&x, NBD_OPT_EXPORT_NAME, "disk", 4);
    struct vd_nbd_hs hs;
    vd_nbd_hs_init(&hs, &ops, NULL, VD_NBD_TLS_OFF);
    size_t used;
    assert_int_equal(vd_nbd_hs_input(&hs, x.b, x.n, &used), VD_NBD_HS_DONE);
    assert_int_equal(hs.out.len, 18 + 10);        /* size + flags, no 124 zeroes */
    assert_false(hs.info.tflags & NBD_FLAG_SEND_DF);   /* no structured replies */
    vd_nbd_hs_free(&hs);
}

static void test_tls_required(void **state)
{
    struct bytes x = { .n = 0 };
    put32(&x, NBD_FLAG_C_FIXED_NEWSTYLE);
    putopt(&x, NBD_OPT_LIST, NULL, 0);
    putopt(&x, NBD_OPT_STARTTLS, NULL, 0);
    struct vd_nbd_hs hs;
    vd_nbd_hs_init(&hs, &ops, NULL, VD_NBD_TLS_REQUIRE);
    size_t used;
    assert_int_equal(vd_nbd_hs_input(&hs, x.b, x.n, &used), VD_NBD_HS_STARTTLS);
    assert_int_equal(used, x.n);
    assert_int_equal(reply_type(&hs, 0, NULL), NBD_REP_ERR_TLS_REQD);
    assert_int_equal(reply_type(&hs, 1, NULL), NBD_REP_ACK);
    vd_nbd_hs_tls_done(&hs);
    struct bytes y = { .n = 0 };
    putopt(&y, NBD_OPT_LIST, NULL, 0);
    assert_int_equal(vd_nbd_hs_input(&hs, y.b, y.n, &used), VD_NBD_HS_MORE);
    assert_int_equal(reply_type(&hs, 2, NULL), NBD_REP_SERVER);
    assert_int_equal(reply_type(&hs, 3, NULL), NBD_REP_ACK);
    vd_nbd_hs_free(&hs);
}

static void test_oversized_option_skipped(void **state)
{
    static struct bytes x;
    x.n = 0;
    put32(&x, NBD_FLAG_C_FIXED_NEWSTYLE);
    static uint8_t junk[VD_NBD_MAX_OPTLEN + 1];
    putopt(&x, NBD_OPT_INFO, junk, sizeof junk);
    putopt(&x, NBD_OPT_ABORT, NULL, 0);
    struct vd_nbd_hs hs;
    vd_nbd_hs_init(&hs, &ops, NULL, VD_NBD_TLS_OFF);
    size_t used;
    assert_int_equal(vd_nbd_hs_input(&hs, x.b, x.n, &used), VD_NBD_HS_CLOSE);
    assert_int_equal(reply_type(&hs, 0, NULL), NBD_REP_ERR_TOO_BIG);
    assert_int_equal(reply_type(&hs, 1, NULL), NBD_REP_ACK);
    assert_null(hs.data);   /* never buffered */
    vd_nbd_hs_free(&hs);
}

static void test_meta_contexts(void **state)
{
    struct bytes x = { .n = 0 };
    put32(&x, NBD_FLAG_C_FIXED_NEWSTYLE);
    putopt(&x, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
    uint8_t q[64];
    size_t n = 0;
    vd_be32(q, 4); memcpy(q + 4, "disk", 4); n = 8;
    vd_be32(q + n, 2); n += 4;
    vd_be32(q + n, 15); memcpy(q + n + 4, "base:allocation", 15); n += 19;
    vd_be32(q + n, 5); memcpy(q + n + 4, "qemu:", 5); n += 9;
    putopt(&x, NBD_OPT_SET_META_CONTEXT, q, (uint32_t)n);
    struct vd_nbd_hs hs;
    vd_nbd_hs_init(&hs, &ops, NULL, VD_NBD_TLS_OFF);
    size_t used;
    assert_int_equal(vd_nbd_hs_input(&hs, x.b, x.n, &used), VD_NBD_HS_MORE);
    assert_int_equal(reply_type(&hs, 1, NULL), NBD_REP_META_CONTEXT);
    assert_int_equal(reply_type(&hs, 2, NULL), NBD_REP_ACK);   /* "qemu:" selects nothing in SET */
    assert_true(hs.meta_alloc);
    assert_false(hs.meta_depth);
    vd_nbd_hs_free(&hs);
}

static void test_request_checks(void **state)
{
    struct vd_nbd_session s = { .size = 1 << 20, .tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FAST_ZERO,
                                .structured = true, .meta_alloc = true };
    struct vd_nbd_request r = { .type = NBD_CMD_READ, .off = 0, .len = 4096 };
    const char *why;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), 0);
    r.off = (1 << 20) - 1;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_EINVAL);
    r.type = NBD_CMD_WRITE;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_ENOSPC);
    r.off = 0;
    r.flags = 0x80;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_EINVAL);
    r.flags = NBD_CMD_FLAG_FUA;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), 0);
    r.len = VD_NBD_MAX_BLOCK + 1;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_EOVERFLOW);
    r = (struct vd_nbd_request){ .type = NBD_CMD_WRITE_ZEROES, .flags = NBD_CMD_FLAG_FAST_ZERO, .len = 512 };
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), 0);
    s.tflags |= NBD_FLAG_READ_ONLY;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_EPERM);
    r = (struct vd_nbd_request){ .type = NBD_CMD_BLOCK_STATUS, .len = 0 };
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_EINVAL);
    r.len = 512;
    r.flags = NBD_CMD_FLAG_REQ_ONE;
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), 0);
    r = (struct vd_nbd_request){ .type = NBD_CMD_FLUSH, .len = 1 };
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_EINVAL);
    r = (struct vd_nbd_request){ .type = 99 };
    assert_int_equal(vd_nbd_request_check(&r, &s, &why), NBD_EINVAL);
    uint8_t hdr[28] = { 0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1 };
    struct vd_nbd_request p;
    assert_int_equal(vd_nbd_request_parse(hdr, &p), 0);
    assert_int_equal(p.type, NBD_CMD_WRITE);
    assert_int_equal(p.flags, NBD_CMD_FLAG_FUA);
    hdr[0] = 0;
    assert_int_equal(vd_nbd_request_parse(hdr, &p), -EBADMSG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greeting),
        cmocka_unit_test(test_go_byte_by_byte),
        cmocka_unit_test(test_export_name_no_zeroes),
        cmocka_unit_test(test_tls_required),
        cmocka_unit_test(test_oversized_option_skipped),
        cmocka_unit_test(test_meta_contexts),
        cmocka_unit_test(test_request_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
