/* Fuzz the NBD server's parsers on bytes: the handshake and option
 * haggling (nbd/handshake.c) and, once an export is chosen, transmission
 * request headers and their checks (nbd/request.c). The first input byte
 * picks the TLS policy; STARTTLS is treated as if TLS came up at once. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "nbd/nbd_proto.h"
#include "nbd/nbd_server.h"

static int handles;

static void *f_open(void *opaque, const char *name, struct vd_nbd_export_info *info)
{
    static const char *const names[] = { "", "disk", "ro" };
    for (unsigned i = 0; i < 3; i++)
        if (!strcmp(name, names[i])) {
            info->size = i == 2 ? 4096 : (64u << 20);
            info->tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_DF |
                           NBD_FLAG_SEND_FAST_ZERO | (i == 2 ? NBD_FLAG_READ_ONLY : NBD_FLAG_SEND_TRIM);
            info->name = names[i];
            info->description = i == 1 ? "a disk" : NULL;
            handles++;
            return (void *)(uintptr_t)(i + 1);
        }
    return NULL;
}

static void f_close(void *opaque, void *h)
{
    handles--;
}

static void f_list(void *opaque, void (*emit)(void *ctx, const char *name, const char *desc), void *ctx)
{
    emit(ctx, "disk", "a disk");
    emit(ctx, "ro", NULL);
}

static const struct vd_nbd_hs_ops ops = { f_open, f_close, f_list };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    struct vd_nbd_hs hs;
    vd_nbd_hs_init(&hs, &ops, NULL, (enum vd_nbd_tls)(data[0] % 3));
    data++;
    size--;
    size_t pos = 0;
    enum vd_nbd_hs_result r = VD_NBD_HS_MORE;
    /* Feed in uneven pieces, as a socket would deliver them. */
    while (pos < size) {
        size_t piece = 1 + (size - pos > 1 ? data[pos] % 97 : 0);
        if (piece > size - pos)
            piece = size - pos;
        size_t used = 0;
        r = vd_nbd_hs_input(&hs, data + pos, piece, &used);
        if (used > piece)
            abort();
        pos += used;
        if (hs.out.len > (1u << 20))
            hs.out.len = 0;      /* the connection would have sent it */
        if (r == VD_NBD_HS_STARTTLS) {
            vd_nbd_hs_tls_done(&hs);
            continue;
        }
        if (r != VD_NBD_HS_MORE)
            break;
        if (used == 0 && piece)
            break;   /* must not happen with input left: the parser is stuck */
    }
    if (r == VD_NBD_HS_DONE) {
        struct vd_nbd_session s = {
            .size = hs.info.size, .tflags = hs.info.tflags, .structured = hs.structured,
            .meta_alloc = hs.meta_alloc, .meta_depth = hs.meta_depth,
        };
        while (size - pos >= 28) {
            struct vd_nbd_request req;
            if (vd_nbd_request_parse(data + pos, &req) < 0)
                break;
            pos += 28;
            const char *why;
            int err = vd_nbd_request_check(&req, &s, &why);
            uint32_t payload = vd_nbd_request_payload(&req);
            if (!err && req.type != NBD_CMD_DISC && req.type != NBD_CMD_FLUSH &&
                (req.off > s.size || req.len > s.size - req.off))
                abort();   /* a range past the end got through */
            if (!err && (req.type == NBD_CMD_READ || req.type == NBD_CMD_WRITE) && req.len > VD_NBD_MAX_BLOCK)
                abort();
            if (payload > size - pos)
                break;
            pos += payload;
        }
    }
    vd_nbd_hs_free(&hs);
    if (handles != 0)
        abort();   /* an export reference leaked */
    return 0;
}
