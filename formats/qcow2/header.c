/* qcow2 header: parsing and validation of the header, its extensions and
 * the snapshot table; rewriting cluster 0 (backing file changes, flags). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "qcow2.h"

static const struct { uint8_t type, bit; const char *name; } known_features[] = {
    { 0, 0, "dirty bit" },
    { 0, 1, "corrupt bit" },
    { 0, 2, "external data file" },
    { 0, 3, "compression type" },
    { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" },
    { 2, 0, "bitmaps" },
    { 2, 1, "raw external data" },
};

static int add_ext(struct q2 *s, uint32_t type, const uint8_t *data, uint32_t len)
{
    struct q2_ext *n = realloc(s->exts, (s->n_exts + 1) * sizeof(*n));
    if (!n)
        return -ENOMEM;
    s->exts = n;
    n[s->n_exts].type = type;
    n[s->n_exts].len = len;
    n[s->n_exts].data = malloc(len ? len : 1);
    if (!n[s->n_exts].data)
        return -ENOMEM;
    memcpy(n[s->n_exts].data, data, len);
    s->n_exts++;
    return 0;
}

static const struct q2_ext *find_ext(const struct q2 *s, uint32_t type)
{
    for (size_t i = 0; i < s->n_exts; i++)
        if (s->exts[i].type == type)
            return &s->exts[i];
    return NULL;
}

/* "Unsupported qcow2 feature(s): name, name" from the image's own table. */
static int refuse_features(struct q2 *s, uint64_t unknown)
{
    char msg[1024];
    size_t n = 0;
    const struct q2_ext *ft = find_ext(s, Q2_EXT_FEATURES);
    for (int bit = 0; bit < 64; bit++) {
        if (!(unknown & (1ull << bit)))
            continue;
        char name[47] = "";
        for (uint32_t i = 0; ft && (i + 1) * 48 <= ft->len; i++) {
            const uint8_t *e = ft->data + i * 48;
            if (e[0] == 0 && e[1] == bit) {
                memcpy(name, e + 2, 46);
                name[46] = 0;
            }
        }
        if (name[0])
            n += (size_t)snprintf(msg + n, sizeof(msg) - n, "%s%s", n ? ", " : "", name);
        else
            n += (size_t)snprintf(msg + n, sizeof(msg) - n, "%sunknown incompatible feature bit %d",
                                  n ? ", " : "", bit);
        if (n >= sizeof(msg))
            break;
    }
    return vd_err(-ENOTSUP, "%s: unsupported qcow2 feature(s): %s", s->fname, msg);
}

int vd_q2_parse_header(struct q2 *s, const uint8_t *b, size_t len, uint64_t fsize)
{
    if (len < 72)
        return vd_err(-EINVAL, "%s: truncated qcow2 header (%zu bytes)", s->fname, len);
    if (q2_be32(b) != Q2_MAGIC)
        return vd_err(-EINVAL, "%s: not a qcow2 image (bad magic)", s->fname);
    s->version = q2_be32(b + 4);
    if (s->version != 2 && s->version != 3)
        return vd_err(-ENOTSUP, "%s: unsupported qcow2 version %u", s->fname, s->version);
    uint64_t bf_off = q2_be64(b + 8);
    uint32_t bf_len = q2_be32(b + 16);
    s->cluster_bits = q2_be32(b + 20);
    if (s->cluster_bits < Q2_MIN_CLUSTER_BITS || s->cluster_bits > Q2_MAX_CLUSTER_BITS)
        return vd_err(-EINVAL, "%s: cluster_bits %u out of range (9..21)", s->fname, s->cluster_bits);
    uint64_t cs = 1ull << s->cluster_bits;
    s->size = q2_be64(b + 24);
    uint32_t crypt = q2_be32(b + 32);
    s->l1_size = q2_be32(b + 36);
    s->l1_off = q2_be64(b + 40);
    s->rt_off = q2_be64(b + 48);
    s->rt_clusters = q2_be32(b + 56);
    s->nb_snapshots = q2_be32(b + 60);
    s->snap_off = q2_be64(b + 64);
    s->header_length = 72;
    s->refcount_order = 4;
    s->incompat = s->compat = s->autoclear = 0;
    s->ctype = Q2_CT_ZLIB;
    if (s->version == 3) {
        if (len < 104)
            return vd_err(-EINVAL, "%s: truncated qcow2 v3 header (%zu bytes)", s->fname, len);
        s->incompat = q2_be64(b + 72);
        s->compat = q2_be64(b + 80);
        s->autoclear = q2_be64(b + 88);
        s->refcount_order = q2_be32(b + 96);
        s->header_length = q2_be32(b + 100);
        if (s->header_length < 104 || s->header_length % 8 || s->header_length > cs ||
            s->header_length > len)
            return vd_err(-EINVAL, "%s: invalid header_length %u", s->fname, s->header_length);
        if (s->refcount_order > 6)
            return vd_err(-EINVAL, "%s: refcount_order %u out of range (0..6)", s->fname,
                          s->refcount_order);
        if (s->header_length > 104)
            s->ctype = b[104];
    }
    s->raw_hdr = malloc(s->header_length);
    if (!s->raw_hdr)
        return -ENOMEM;
    memcpy(s->raw_hdr, b, s->header_length);
    s->raw_len = s->header_length;

    /* extensions, up to the backing file name or the end of cluster 0 */
    uint64_t ext_end = cs < len ? cs : len;
    if (bf_off && bf_off < ext_end)
        ext_end = bf_off;
    uint64_t p = s->header_length;
    while (p + 8 <= ext_end) {
        uint32_t type = q2_be32(b + p), elen = q2_be32(b + p + 4);
        if (type == Q2_EXT_END)
            break;
        if (p + 8 + elen > ext_end)
            return vd_err(-EINVAL, "%s: header extension 0x%08x at offset %llu overflows the header area",
                          s->fname, type, (unsigned long long)p);
        const uint8_t *d = b + p + 8;
        if (type == Q2_EXT_BACKING_FMT) {
            if (elen > 63)
                return vd_err(-EINVAL, "%s: backing format name too long (%u bytes)", s->fname, elen);
            free(s->backing_fmt);
            s->backing_fmt = strndup((const char *)d, elen);
            if (!s->backing_fmt)
                return -ENOMEM;
        } else {
            int r = add_ext(s, type, d, elen);
            if (r < 0)
                return r;
        }
        p += 8 + (((uint64_t)elen + 7) & ~7ull);
    }

    uint64_t unknown = s->incompat & ~Q2_INCOMPAT_KNOWN;
    if (unknown)
        return refuse_features(s, unknown);
    if (s->incompat & Q2_INCOMPAT_DATAFILE)
        return vd_err(-ENOTSUP, "%s: images with an external data file are not supported", s->fname);
    if (crypt)
        return vd_err(-ENOTSUP, "%s: encrypted qcow2 images are not supported (crypt_method %u)",
                      s->fname, crypt);
    if (s->ctype > Q2_CT_ZSTD)
        return vd_err(-ENOTSUP, "%s: unknown compression type %u", s->fname, s->ctype);
    if (!!(s->incompat & Q2_INCOMPAT_COMPRESS) != (s->ctype != 0))
        return vd_err(-EINVAL, "%s: compression type %u does not match the compression type feature bit",
                      s->fname, s->ctype);
    s->ext_l2 = !!(s->incompat & Q2_INCOMPAT_EXTL2);
    if (s->ext_l2 && s->cluster_bits < 14)
        return vd_err(-EINVAL, "%s: extended L2 entries need clusters of at least 16 KiB", s->fname);
    s->lazy = !!(s->compat & Q2_COMPAT_LAZY);
    vd_q2_geometry(s);

    /* sizes and tables */
    if (s->size > (1ull << 62))
        return vd_err(-EFBIG, "%s: virtual size %llu is absurd", s->fname, (unsigned long long)s->size);
    uint64_t per_l1 = cs * s->l2_entries;
    uint64_t need = (s->size + per_l1 - 1) / per_l1;
    if ((uint64_t)s->l1_size * 8 > Q2_MAX_L1_BYTES)
        return vd_err(-EFBIG, "%s: L1 table of %u entries is larger than %u MiB", s->fname, s->l1_size,
                      Q2_MAX_L1_BYTES >> 20);
    if (need > s->l1_size)
        return vd_err(-EINVAL, "%s: L1 table (%u entries) too small for the virtual size %llu",
                      s->fname, s->l1_size, (unsigned long long)s->size);
    if (s->l1_size) {
        if (!s->l1_off || (s->l1_off & (cs - 1)))
            return vd_err(-EINVAL, "%s: L1 table offset 0x%llx is not cluster aligned", s->fname,
                          (unsigned long long)s->l1_off);
        if (s->l1_off + (uint64_t)s->l1_size * 8 > fsize)
            return vd_err(-EINVAL, "%s: L1 table at 0x%llx (%u entries) lies past the end of the file",
                          s->fname, (unsigned long long)s->l1_off, s->l1_size);
    }
    if (!s->rt_clusters)
        return vd_err(-EINVAL, "%s: image has no refcount table", s->fname);
    if ((uint64_t)s->rt_clusters * cs > Q2_MAX_RT_BYTES)
        return vd_err(-EFBIG, "%s: refcount table of %u clusters is larger than %u MiB", s->fname,
                      s->rt_clusters, Q2_MAX_RT_BYTES >> 20);
    if (!s->rt_off || (s->rt_off & (cs - 1)))
        return vd_err(-EINVAL, "%s: refcount table offset 0x%llx is not cluster aligned", s->fname,
                      (unsigned long long)s->rt_off);
    if (s->rt_off + (uint64_t)s->rt_clusters * cs > ((fsize + cs - 1) & ~(cs - 1)))
        return vd_err(-EINVAL, "%s: refcount table at 0x%llx lies past the end of the file", s->fname,
                      (unsigned long long)s->rt_off);
    if (s->nb_snapshots > Q2_MAX_SNAPSHOTS)
        return vd_err(-EINVAL, "%s: too many snapshots (%u)", s->fname, s->nb_snapshots);
    if (s->nb_snapshots && (!s->snap_off || (s->snap_off & (cs - 1)) || s->snap_off >= fsize))
        return vd_err(-EINVAL, "%s: snapshot table offset 0x%llx is invalid", s->fname,
                      (unsigned long long)s->snap_off);

    if (bf_off) {
        if (bf_len > Q2_MAX_BACKING_NAME || bf_len == 0)
            return vd_err(-EINVAL, "%s: backing file name length %u is invalid", s->fname, bf_len);
        if (bf_off + bf_len > cs || bf_off + bf_len > len)
            return vd_err(-EINVAL, "%s: backing file name at %llu lies outside the first cluster",
                          s->fname, (unsigned long long)bf_off);
        s->backing = strndup((const char *)b + bf_off, bf_len);
        if (!s->backing)
            return -ENOMEM;
        if (strlen(s->backing) != bf_len)
            return vd_err(-EINVAL, "%s: backing file name contains a NUL byte", s->fname);
    }
    return 0;
}

int vd_q2_load_snapshots(struct q2 *s, uint64_t fsize)
{
    if (!s->nb_snapshots)
        return 0;
    s->snaps = calloc(s->nb_snapshots, sizeof(*s->snaps));
    if (!s->snaps)
        return -ENOMEM;
    uint64_t p = s->snap_off;
    uint8_t h[40];
    uint8_t *var = malloc(1024 + 2 * 65536);
    if (!var)
        return -ENOMEM;
    int r = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct q2_snap *sn = &s->snaps[i];
        if (p + 40 > fsize || p - s->snap_off > (64u << 20)) {
            r = vd_err(-EINVAL, "%s: snapshot table entry %u lies past the end of the file", s->fname, i);
            break;
        }
        if ((r = vd_file_pread(s->f, h, 40, p)) < 0)
            break;
        sn->l1_off = q2_be64(h);
        sn->l1_size = q2_be32(h + 8);
        uint32_t id_len = q2_be16(h + 12), name_len = q2_be16(h + 14);
        sn->date_sec = q2_be32(h + 16);
        sn->date_nsec = q2_be32(h + 20);
        sn->vm_clock_nsec = q2_be64(h + 24);
        sn->vm_state_size = q2_be32(h + 32);
        uint32_t extra = q2_be32(h + 36);
        if (extra > 1024) {
            r = vd_err(-EINVAL, "%s: snapshot %u has %u bytes of extra data (at most 1024)", s->fname, i, extra);
            break;
        }
        uint64_t vlen = (uint64_t)extra + id_len + name_len;
        if (p + 40 + vlen > fsize) {
            r = vd_err(-EINVAL, "%s: snapshot table entry %u lies past the end of the file", s->fname, i);
            break;
        }
        if ((r = vd_file_pread(s->f, var, vlen, p + 40)) < 0)
            break;
        if (extra >= 8)
            sn->vm_state_size = q2_be64(var);
        sn->disk_size = extra >= 16 ? q2_be64(var + 8) : s->size;
        if (extra >= 24) {
            sn->icount = q2_be64(var + 16);
            sn->has_icount = sn->icount != UINT64_MAX;
        }
        sn->id = strndup((char *)var + extra, id_len);
        sn->name = strndup((char *)var + extra + id_len, name_len);
        if (!sn->id || !sn->name) {
            r = -ENOMEM;
            break;
        }
        if ((sn->l1_off & (s->cs - 1)) || (uint64_t)sn->l1_size * 8 > Q2_MAX_L1_BYTES ||
            (sn->l1_size && (!sn->l1_off || sn->l1_off + (uint64_t)sn->l1_size * 8 > fsize))) {
            r = vd_err(-EINVAL, "%s: snapshot %u has an invalid L1 table (offset 0x%llx, %u entries)",
                       s->fname, i, (unsigned long long)sn->l1_off, sn->l1_size);
            break;
        }
        p += (40 + vlen + 7) & ~7ull;
    }
    s->snap_bytes = p - s->snap_off;
    free(var);
    return r;
}

void vd_q2_free_header(struct q2 *s)
{
    free(s->backing);
    free(s->backing_fmt);
    s->backing = s->backing_fmt = NULL;
    for (size_t i = 0; i < s->n_exts; i++)
        free(s->exts[i].data);
    free(s->exts);
    s->exts = NULL;
    s->n_exts = 0;
    for (uint32_t i = 0; s->snaps && i < s->nb_snapshots; i++) {
        free(s->snaps[i].id);
        free(s->snaps[i].name);
    }
    free(s->snaps);
    s->snaps = NULL;
    free(s->raw_hdr);
    s->raw_hdr = NULL;
}

static int put_ext(uint8_t *b, size_t cap, size_t *p, uint32_t type, const void *d, uint32_t len)
{
    size_t need = 8 + ((len + 7) & ~7u);
    if (*p + need > cap)
        return -ENOSPC;
    q2_put32(b + *p, type);
    q2_put32(b + *p + 4, len);
    memset(b + *p + 8, 0, need - 8);
    memcpy(b + *p + 8, d, len);
    *p += need;
    return 0;
}

int vd_q2_build_header(const struct q2 *s, uint8_t *b, size_t cap)
{
    uint32_t hl = s->version == 3 ? (s->header_length >= 112 ? s->header_length : 112) : 72;
    if (cap < hl + 8)
        return -ENOSPC;
    memset(b, 0, cap);
    if (s->raw_hdr && s->raw_len > 105 && s->version == 3)
        memcpy(b + 105, s->raw_hdr + 105, (s->raw_len < hl ? s->raw_len : hl) - 105);
    q2_put32(b, Q2_MAGIC);
    q2_put32(b + 4, s->version);
    q2_put32(b + 20, s->cluster_bits);
    q2_put64(b + 24, s->size);
    q2_put32(b + 36, s->l1_size);
    q2_put64(b + 40, s->l1_off);
    q2_put64(b + 48, s->rt_off);
    q2_put32(b + 56, s->rt_clusters);
    q2_put32(b + 60, s->nb_snapshots);
    q2_put64(b + 64, s->snap_off);
    if (s->version == 3) {
        q2_put64(b + 72, s->incompat);
        q2_put64(b + 80, s->compat);
        q2_put64(b + 88, s->autoclear);
        q2_put32(b + 96, s->refcount_order);
        q2_put32(b + 100, hl);
        b[104] = s->ctype;
    }
    size_t p = hl;
    int r;
    if (s->backing_fmt &&
        (r = put_ext(b, cap, &p, Q2_EXT_BACKING_FMT, s->backing_fmt, (uint32_t)strlen(s->backing_fmt))) < 0)
        return r;
    bool have_ft = false;
    for (size_t i = 0; i < s->n_exts; i++) {
        have_ft |= s->exts[i].type == Q2_EXT_FEATURES;
        if ((r = put_ext(b, cap, &p, s->exts[i].type, s->exts[i].data, s->exts[i].len)) < 0)
            return r;
    }
    if (!have_ft && s->version == 3) {
        uint8_t ft[sizeof(known_features) / sizeof(known_features[0]) * 48];
        memset(ft, 0, sizeof(ft));
        for (size_t i = 0; i < sizeof(known_features) / sizeof(known_features[0]); i++) {
            ft[i * 48] = known_features[i].type;
            ft[i * 48 + 1] = known_features[i].bit;
            memcpy(ft + i * 48 + 2, known_features[i].name, strlen(known_features[i].name));
        }
        if ((r = put_ext(b, cap, &p, Q2_EXT_FEATURES, ft, sizeof(ft))) < 0)
            return r;
    }
    if (p + 8 > cap)
        return -ENOSPC;
    p += 8;   /* end of extensions */
    if (s->backing) {
        size_t bl = strlen(s->backing);
        if (p + bl > cap)
            return -ENOSPC;
        memcpy(b + p, s->backing, bl);
        q2_put64(b + 8, p);
        q2_put32(b + 16, (uint32_t)bl);
        p += bl;
    }
    return (int)p;
}

int vd_q2_write_header(struct q2 *s)
{
    uint8_t *b = malloc(s->cs);
    if (!b)
        return -ENOMEM;
    int n = vd_q2_build_header(s, b, s->cs);
    int r = n;
    if (n == -ENOSPC)
        r = vd_err(-ENOSPC, "%s: the header, its extensions and the backing file name do not fit in "
                   "the first cluster (%llu bytes)", s->fname, (unsigned long long)s->cs);
    else if (n >= 0) {
        r = vd_file_pwrite(s->f, b, (size_t)n, 0);
        if (r < 0)
            vd_err(r, "%s: writing the header failed", s->fname);
        else
            r = vd_file_sync(s->f);
    }
    free(b);
    return r;
}

int vd_q2_update_incompat(struct q2 *s, uint64_t v)
{
    if (s->version < 3)
        return 0;
    uint8_t b[8];
    q2_put64(b, v);
    int r = vd_file_pwrite(s->f, b, 8, 72);
    if (r < 0)
        return vd_err(r, "%s: updating the incompatible feature bits failed", s->fname);
    if ((r = vd_file_sync(s->f)) < 0)
        return r;
    s->incompat = v;
    return 0;
}
