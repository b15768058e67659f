/* Transmission-phase request headers: parse 28 bytes and decide whether a
 * request may run against the negotiated session. Pure functions over
 * bytes, shared by the connection code and the fuzzer. */
#include <errno.h>
#include "nbd/nbd_proto.h"
#include "nbd/nbd_server.h"

int vd_nbd_request_parse(const uint8_t hdr[28], struct vd_nbd_request *r)
{
    if (vd_rd32(hdr) != NBD_REQUEST_MAGIC)
        return -EBADMSG;
    r->flags = vd_rd16(hdr + 4);
    r->type = vd_rd16(hdr + 6);
    r->cookie = vd_rd64(hdr + 8);
    r->off = vd_rd64(hdr + 16);
    r->len = vd_rd32(hdr + 24);
    return 0;
}

uint32_t vd_nbd_request_payload(const struct vd_nbd_request *r)
{
    return r->type == NBD_CMD_WRITE ? r->len : 0;
}

const char *vd_nbd_cmd_name(uint16_t type)
{
    switch (type) {
    case NBD_CMD_READ: return "read";
    case NBD_CMD_WRITE: return "write";
    case NBD_CMD_DISC: return "disconnect";
    case NBD_CMD_FLUSH: return "flush";
    case NBD_CMD_TRIM: return "trim";
    case NBD_CMD_CACHE: return "cache";
    case NBD_CMD_WRITE_ZEROES: return "write-zeroes";
    case NBD_CMD_BLOCK_STATUS: return "block-status";
    default: return "unknown";
    }
}

int vd_nbd_request_check(const struct vd_nbd_request *r, const struct vd_nbd_session *s,
                         const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    *why = NULL;
    uint16_t allowed;
    bool writes = false, ranged = true;
    switch (r->type) {
    case NBD_CMD_READ:
        allowed = NBD_CMD_FLAG_DF;
        if ((r->flags & NBD_CMD_FLAG_DF) && !s->structured) {
            *why = "DF flag without structured replies";
            return NBD_EINVAL;
        }
        break;
    case NBD_CMD_WRITE:
        allowed = 0;
        writes = true;
        break;
    case NBD_CMD_FLUSH:
        allowed = 0;
        ranged = false;
        if (r->off || r->len) {
            *why = "flush with a non-zero offset or length";
            return NBD_EINVAL;
        }
        break;
    case NBD_CMD_TRIM:
        allowed = 0;
        writes = true;
        break;
    case NBD_CMD_CACHE:
        allowed = 0;
        break;
    case NBD_CMD_WRITE_ZEROES:
        allowed = NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
        writes = true;
        break;
    case NBD_CMD_BLOCK_STATUS:
        allowed = NBD_CMD_FLAG_REQ_ONE;
        if (!s->structured || !(s->meta_alloc || s->meta_depth)) {
            *why = "block status without a negotiated metadata context";
            return NBD_EINVAL;
        }
        if (r->len == 0) {
            *why = "zero-length block status";
            return NBD_EINVAL;
        }
        break;
    case NBD_CMD_DISC:
        return 0;
    default:
        *why = "unknown command";
        return NBD_EINVAL;
    }
    /* FUA is valid on every command once advertised. */
    allowed |= NBD_CMD_FLAG_FUA;
    if (r->flags & ~allowed) {
        *why = "flag not valid for this command";
        return NBD_EINVAL;
    }
    if ((r->flags & NBD_CMD_FLAG_FAST_ZERO) && !(s->tflags & NBD_FLAG_SEND_FAST_ZERO)) {
        *why = "FAST_ZERO was not negotiated";
        return NBD_EINVAL;
    }
    if (!ranged)
        return writes && (s->tflags & NBD_FLAG_READ_ONLY) ? NBD_EPERM : 0;
    if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) && r->len > VD_NBD_MAX_BLOCK) {
        *why = "request larger than the maximum block size (32 MiB)";
        return r->type == NBD_CMD_READ ? NBD_EINVAL : NBD_EOVERFLOW;
    }
    if (writes && (s->tflags & NBD_FLAG_READ_ONLY)) {
        *why = "export is read-only";
        return NBD_EPERM;
    }
    if (r->off > s->size || r->len > s->size - r->off) {
        *why = "request beyond the end of the export";
        return writes ? NBD_ENOSPC : NBD_EINVAL;
    }
    return 0;
}
