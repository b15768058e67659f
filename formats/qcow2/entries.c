/* qcow2 on-disk encodings: geometry, refcount entries of every width,
 * compressed cluster descriptors, standard and extended L2 entries. */
#include <errno.h>
#include "vdisk/error.h"
#include "qcow2.h"

void vd_q2_geometry(struct q2 *s)
{
    s->cs = 1ull << s->cluster_bits;
    s->l2_esize = s->ext_l2 ? 16 : 8;
    s->l2_entries = (uint32_t)(s->cs / s->l2_esize);
    s->l2_bits = s->cluster_bits - (s->ext_l2 ? 4 : 3);
    s->sc_size = s->ext_l2 ? s->cs / 32 : s->cs;
    s->refcount_bits = 1u << s->refcount_order;
    s->rb_entries = s->cs * 8 / s->refcount_bits;
    s->rc_max = s->refcount_bits == 64 ? UINT64_MAX : (1ull << s->refcount_bits) - 1;
    s->csize_shift = 62 - (int)(s->cluster_bits - 8);
    s->csize_mask = (1ull << (s->cluster_bits - 8)) - 1;
    s->coff_mask = (1ull << s->csize_shift) - 1;
}

/* Sub-byte widths pack entries from the least significant bit of each
 * byte; 8 bits and wider are plain big-endian integers. */
uint64_t vd_q2_rc_get(const uint8_t *b, uint64_t i, uint32_t order)
{
    switch (order) {
    case 0: return (b[i / 8] >> (i % 8)) & 1;
    case 1: return (b[i / 4] >> (2 * (i % 4))) & 3;
    case 2: return (b[i / 2] >> (4 * (i % 2))) & 15;
    case 3: return b[i];
    case 4: return q2_be16(b + 2 * i);
    case 5: return q2_be32(b + 4 * i);
    default: return q2_be64(b + 8 * i);
    }
}

void vd_q2_rc_set(uint8_t *b, uint64_t i, uint32_t order, uint64_t v)
{
    unsigned sh;
    switch (order) {
    case 0: sh = i % 8; b[i / 8] = (uint8_t)((b[i / 8] & ~(1u << sh)) | ((v & 1) << sh)); break;
    case 1: sh = 2 * (i % 4); b[i / 4] = (uint8_t)((b[i / 4] & ~(3u << sh)) | ((v & 3) << sh)); break;
    case 2: sh = 4 * (i % 2); b[i / 2] = (uint8_t)((b[i / 2] & ~(15u << sh)) | ((v & 15) << sh)); break;
    case 3: b[i] = (uint8_t)v; break;
    case 4: q2_put16(b + 2 * i, (uint16_t)v); break;
    case 5: q2_put32(b + 4 * i, (uint32_t)v); break;
    default: q2_put64(b + 8 * i, v); break;
    }
}

uint64_t vd_q2_comp_encode(const struct q2 *s, uint64_t host, uint64_t len)
{
    uint64_t extra = ((host + len - 1) >> 9) - (host >> 9);
    return Q2_COMPRESSED | (extra << s->csize_shift) | host;
}

void vd_q2_comp_decode(const struct q2 *s, uint64_t e, uint64_t *host, uint64_t *len)
{
    uint64_t h = e & s->coff_mask;
    uint64_t extra = (e >> s->csize_shift) & s->csize_mask;
    *host = h;
    *len = (extra + 1) * 512 - (h & 511);
}

int vd_q2_classify(const struct q2 *s, uint64_t e, uint64_t bm, unsigned sc, enum q2_kind *k)
{
    if (e & Q2_COMPRESSED) {
        uint64_t h = e & s->coff_mask;
        if (h >> 56)
            return vd_err(-EIO, "%s: compressed cluster descriptor 0x%llx has offset bits past 56",
                          s->fname, (unsigned long long)e);
        *k = Q2_COMPRESSED_K;
        return 0;
    }
    if (e & Q2_L2_RESERVED)
        return vd_err(-EIO, "%s: L2 entry 0x%llx has reserved bits set", s->fname, (unsigned long long)e);
    uint64_t host = e & Q2_OFF_MASK;
    if (host & (s->cs - 1))
        return vd_err(-EIO, "%s: L2 entry 0x%llx: cluster offset not aligned to the cluster size",
                      s->fname, (unsigned long long)e);
    if (!s->ext_l2) {
        if (e & Q2_ZERO)
            *k = host ? Q2_ZERO_ALLOC : Q2_ZERO_PLAIN;
        else
            *k = host ? Q2_NORMAL : Q2_UNALLOC;
        return 0;
    }
    bool a = (bm >> sc) & 1, z = (bm >> (32 + sc)) & 1;
    if (a && z)
        return vd_err(-EIO, "%s: extended L2 bitmap 0x%llx marks subcluster %u both allocated and zero",
                      s->fname, (unsigned long long)bm, sc);
    if (a && !host)
        return vd_err(-EIO, "%s: extended L2 entry: subcluster %u allocated but the cluster has no offset",
                      s->fname, sc);
    if (a) *k = Q2_NORMAL;
    else if (z) *k = host ? Q2_ZERO_ALLOC : Q2_ZERO_PLAIN;
    else *k = Q2_UNALLOC;
    return 0;
}
