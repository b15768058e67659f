/* qcow2 image creation (v2/v3, any cluster size and refcount width,
 * extended L2, lazy refcounts, zlib/zstd, backing file, preallocation) and
 * resizing (growing; shrinking over unused clusters only). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "qcow2.h"

static int parse_opts(struct q2 *s, const struct vd_create_opts *o, const char *fname)
{
    struct vd_opts *op = o->opts;
    const char *compat = op ? vd_opts_get(op, "compat") : NULL;
    uint64_t cs = 65536, rb = 16;
    bool ext = false, lazy = false;
    int r;
    s->version = 3;
    if (compat) {
        if (!strcmp(compat, "0.10") || !strcmp(compat, "v2"))
            s->version = 2;
        else if (strcmp(compat, "1.1") && strcmp(compat, "v3"))
            return vd_err(-EINVAL, "%s: invalid compat '%s' (0.10 or 1.1)", fname, compat);
    }
    if (op && ((r = vd_opts_get_size(op, "cluster_size", &cs)) < 0 ||
               (r = vd_opts_get_u64(op, "refcount_bits", &rb)) < 0 ||
               (r = vd_opts_get_bool(op, "extended_l2", &ext)) < 0 ||
               (r = vd_opts_get_bool(op, "lazy_refcounts", &lazy)) < 0))
        return r;
    if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
        return vd_err(-EINVAL, "%s: cluster size must be a power of two between 512 and 2M", fname);
    if (!rb || rb > 64 || (rb & (rb - 1)))
        return vd_err(-EINVAL, "%s: refcount_bits must be a power of two up to 64", fname);
    if (s->version == 2 && rb != 16)
        return vd_err(-EINVAL, "%s: compat=0.10 images only support refcount_bits=16", fname);
    if (s->version == 2 && lazy)
        return vd_err(-EINVAL, "%s: lazy refcounts need compat=1.1", fname);
    if (ext && s->version == 2)
        return vd_err(-EINVAL, "%s: extended L2 entries need compat=1.1", fname);
    if (ext && cs < 16384)
        return vd_err(-EINVAL, "%s: extended L2 entries need a cluster size of at least 16K", fname);
    const char *ct = op ? vd_opts_get(op, "compression_type") : NULL;
    s->ctype = Q2_CT_ZLIB;
    if (ct && !strcmp(ct, "zstd")) {
        if (s->version == 2)
            return vd_err(-EINVAL, "%s: compression_type=zstd needs compat=1.1", fname);
        s->ctype = Q2_CT_ZSTD;
    } else if (ct && strcmp(ct, "zlib")) {
        return vd_err(-EINVAL, "%s: invalid compression_type '%s' (zlib or zstd)", fname, ct);
    }
    s->cluster_bits = (uint32_t)__builtin_ctzll(cs);
    s->refcount_order = (uint32_t)__builtin_ctzll(rb);
    s->ext_l2 = ext;
    s->incompat = (ext ? Q2_INCOMPAT_EXTL2 : 0) | (s->ctype ? Q2_INCOMPAT_COMPRESS : 0);
    s->compat = lazy ? Q2_COMPAT_LAZY : 0;
    s->header_length = s->version == 3 ? 112 : 72;
    vd_q2_geometry(s);
    return 0;
}

static int pwrite_or(struct q2 *s, const void *b, size_t n, uint64_t off, const char *what)
{
    int r = vd_file_pwrite(s->f, b, n, off);
    if (r < 0)
        return vd_err(r, "%s: writing the %s at 0x%llx failed", s->fname, what, (unsigned long long)off);
    return 0;
}

int vd_q2_create(const char *filename, const struct vd_create_opts *o)
{
    struct q2 st, *s = &st;
    memset(s, 0, sizeof(*s));
    s->fname = filename;
    int r = parse_opts(s, o, filename);
    if (r < 0)
        return r;
    if (o->opts) {
        const char *enc = vd_opts_get(o->opts, "encryption");
        const char *ef = vd_opts_get(o->opts, "encrypt.format");
        const char *df = vd_opts_get(o->opts, "data_file");
        if ((enc && strcmp(enc, "off")) || ef)
            return vd_err(-ENOTSUP, "%s: encrypted qcow2 images are not supported", filename);
        if (df)
            return vd_err(-ENOTSUP, "%s: external data files are not supported", filename);
    }
    uint64_t cs = s->cs, size = (o->size + 511) & ~511ull;   /* whole sectors, as qemu-img */
    s->size = size;
    uint64_t per_l1 = cs * s->l2_entries;
    uint64_t l1_size = (size + per_l1 - 1) / per_l1;
    if (l1_size * 8 > Q2_MAX_L1_BYTES)
        return vd_err(-EFBIG, "%s: image size too large for a %llu-byte cluster size", filename,
                      (unsigned long long)cs);
    s->l1_size = (uint32_t)l1_size;
    if (o->backing && strlen(o->backing) > Q2_MAX_BACKING_NAME)
        return vd_err(-EINVAL, "%s: backing file name too long", filename);
    s->backing = o->backing ? (char *)o->backing : NULL;
    s->backing_fmt = o->backing && o->backing_fmt ? (char *)o->backing_fmt : NULL;

    bool pre = o->prealloc != VD_PREALLOC_OFF;
    uint64_t l1c = (l1_size * 8 + cs - 1) / cs;
    uint64_t n_l2 = pre ? l1_size : 0, n_data = pre ? (size + cs - 1) / cs : 0;
    uint64_t T = 1, B = 1;
    for (int it = 0; it < 64; it++) {
        uint64_t total = 1 + T + B + l1c + n_l2 + n_data;
        uint64_t nB = (total + s->rb_entries - 1) / s->rb_entries;
        uint64_t nT = (nB * 8 + cs - 1) / cs;
        if (nB == B && nT == T)
            break;
        B = nB;
        T = nT;
    }
    if (T * cs > Q2_MAX_RT_BYTES)
        return vd_err(-EFBIG, "%s: refcount table would be too large; use a bigger cluster size", filename);
    uint64_t rt_c = 1, rb_c = rt_c + T, l1_c = rb_c + B, l2_c = l1_c + l1c, d_c = l2_c + n_l2;
    uint64_t total = d_c + n_data;
    s->rt_off = rt_c * cs;
    s->rt_clusters = (uint32_t)T;
    s->l1_off = l1_size ? l1_c * cs : 0;
    if (!l1_size)
        s->l1_off = l1_c * cs;

    struct vd_file *f;
    if ((r = vd_file_open(filename, VD_FILE_CREATE | VD_FILE_TRUNC, VD_CACHE_WRITEBACK, &f)) < 0)
        return r;
    s->f = f;
    uint8_t *buf = calloc(1, cs > 4096 ? cs : 4096);
    uint8_t *big = NULL;
    if (!buf) {
        r = -ENOMEM;
        goto out;
    }
    int n = vd_q2_build_header(s, buf, cs);
    if (n < 0) {
        r = vd_err(-EINVAL, "%s: header and backing file name do not fit in a %llu-byte cluster",
                   filename, (unsigned long long)cs);
        goto out;
    }
    if ((r = vd_file_truncate(f, total * cs)) < 0)
        goto out;
    /* refcount table and blocks */
    big = calloc(1, (T > B ? T : B) * cs);
    if (!big) {
        r = -ENOMEM;
        goto out;
    }
    for (uint64_t b = 0; b < B; b++)
        q2_put64(big + 8 * b, (rb_c + b) * cs);
    if ((r = pwrite_or(s, big, T * cs, s->rt_off, "refcount table")) < 0)
        goto out;
    memset(big, 0, B * cs);
    for (uint64_t c = 0; c < total; c++)
        vd_q2_rc_set(big + (c / s->rb_entries) * cs, c % s->rb_entries, s->refcount_order, 1);
    if ((r = pwrite_or(s, big, B * cs, rb_c * cs, "refcount blocks")) < 0)
        goto out;
    free(big);
    big = NULL;
    /* L2 tables (preallocation) and the L1 table */
    if (pre) {
        big = malloc(cs);
        if (!big) {
            r = -ENOMEM;
            goto out;
        }
        for (uint64_t t = 0; t < n_l2; t++) {
            memset(big, 0, cs);
            for (uint64_t j = 0; j < s->l2_entries; j++) {
                uint64_t g = t * s->l2_entries + j;
                if (g >= n_data)
                    break;
                q2_l2_set(s, big, j, ((d_c + g) * cs) | Q2_COPIED, 0xffffffffu);
            }
            if ((r = pwrite_or(s, big, cs, (l2_c + t) * cs, "L2 table")) < 0)
                goto out;
        }
        free(big);
        big = NULL;
    }
    if (l1_size) {
        big = calloc(1, l1c * cs);
        if (!big) {
            r = -ENOMEM;
            goto out;
        }
        for (uint64_t i = 0; pre && i < l1_size; i++)
            q2_put64(big + 8 * i, ((l2_c + i) * cs) | Q2_COPIED);
        if ((r = pwrite_or(s, big, l1c * cs, s->l1_off, "L1 table")) < 0)
            goto out;
    }
    if (o->prealloc == VD_PREALLOC_FALLOC && n_data)
        r = vd_file_allocate(f, d_c * cs, n_data * cs);
    else if (o->prealloc == VD_PREALLOC_FULL && n_data)
        r = vd_file_write_zeros(f, d_c * cs, n_data * cs);
    if (r < 0) {
        vd_err(r, "%s: preallocating %llu bytes failed", filename, (unsigned long long)(n_data * cs));
        goto out;
    }
    /* the header last: until it is written the file is no qcow2 image */
    if ((r = vd_file_sync(f)) < 0)
        goto out;
    if ((r = pwrite_or(s, buf, (size_t)n, 0, "header")) < 0)
        goto out;
    r = vd_file_sync(f);
out:
    free(big);
    free(buf);
    vd_file_close(f);
    return r;
}

int vd_q2_preallocate(struct q2 *s, uint64_t off, uint64_t len, enum vd_prealloc mode)
{
    uint64_t cs = s->cs, end = off + len;
    int r;
    for (uint64_t c = off / cs; c * cs < end;) {
        uint8_t *tbl;
        if ((r = vd_q2_l2_table(s, c >> s->l2_bits, true, &tbl)) < 0)
            return r;
        uint64_t idx = c & (s->l2_entries - 1);
        uint64_t e = q2_l2_entry(s, tbl, idx);
        if ((e & Q2_COMPRESSED) || (e & Q2_OFF_MASK)) {
            c++;
            continue;
        }
        uint64_t host, got, old_end = s->host_end;
        if ((r = vd_q2_alloc(s, 1, true, &host, &got)) < 0)
            return r;
        if (host < old_end && (r = vd_file_zero(s->f, host, cs)) < 0)
            return r;
        if ((r = vd_q2_l2_table(s, c >> s->l2_bits, true, &tbl)) < 0)
            return r;
        q2_l2_set(s, tbl, idx, host | Q2_COPIED, 0xffffffffu);
        vd_q2_cache_dirty(&s->l2c, tbl);
        if (mode == VD_PREALLOC_FALLOC && (r = vd_file_allocate(s->f, host, cs)) < 0)
            return r;
        if (mode == VD_PREALLOC_FULL && (r = vd_file_write_zeros(s->f, host, cs)) < 0)
            return r;
        c++;
    }
    uint64_t fsize;
    if ((r = vd_file_size(s->f, &fsize)) < 0)
        return r;
    if (fsize < s->host_end && (r = vd_file_truncate(s->f, s->host_end)) < 0)
        return r;
    return vd_q2_flush_all(s);
}

static int grow_l1(struct q2 *s, uint64_t need)
{
    uint64_t bytes = need * 8, nc = (bytes + s->cs - 1) / s->cs;
    if (bytes > Q2_MAX_L1_BYTES)
        return vd_err(-EFBIG, "%s: L1 table would exceed %u MiB", s->fname, Q2_MAX_L1_BYTES >> 20);
    int r = vd_q2_flush_all(s);
    if (r < 0)
        return r;
    uint64_t host, got;
    if ((r = vd_q2_alloc(s, nc, true, &host, &got)) < 0)
        return r;
    uint64_t *nl1 = calloc(nc * s->cs / 8, 8);
    uint8_t *b = calloc(1, nc * s->cs);
    if (!nl1 || !b) {
        free(nl1);
        free(b);
        return -ENOMEM;
    }
    memcpy(nl1, s->l1, (size_t)s->l1_size * 8);
    for (uint64_t i = 0; i < s->l1_size; i++)
        q2_put64(b + 8 * i, s->l1[i]);
    /* the new table and its refcounts before the header points at it */
    r = vd_q2_cache_flush(&s->rcc);
    if (r == 0)
        r = vd_file_pwrite(s->f, b, nc * s->cs, host);
    if (r == 0)
        r = vd_file_sync(s->f);
    uint8_t h[12];
    q2_put32(h, (uint32_t)need);
    q2_put64(h + 4, host);
    if (r == 0)
        r = vd_file_pwrite(s->f, h, 12, 36);
    if (r == 0)
        r = vd_file_sync(s->f);
    free(b);
    if (r < 0) {
        free(nl1);
        return vd_err(r, "%s: growing the L1 table failed", s->fname);
    }
    uint64_t old_off = s->l1_off, old_bytes = (uint64_t)s->l1_size * 8;
    free(s->l1);
    s->l1 = nl1;
    s->l1_size = (uint32_t)need;
    s->l1_off = host;
    s->l1_dlo = s->l1_dhi = 0;
    return old_bytes ? vd_q2_free_now(s, old_off, old_bytes) : 0;
}

static int write_size(struct q2 *s, uint64_t size)
{
    uint8_t b[8];
    q2_put64(b, size);
    int r = vd_file_pwrite(s->f, b, 8, 24);
    if (r == 0)
        r = vd_file_sync(s->f);
    if (r < 0)
        return vd_err(r, "%s: updating the virtual size failed", s->fname);
    s->size = size;
    s->l->size = size;
    return 0;
}

int vd_q2_resize(struct vd_layer *l, uint64_t size, enum vd_prealloc prealloc)
{
    struct q2 *s = l->priv;
    int r;
    if (size == s->size)
        return 0;
    if ((r = vd_q2_comp_flush(s)) < 0)
        return r;
    if (size > (1ull << 62))
        return vd_err(-EFBIG, "%s: size %llu is too large", s->fname, (unsigned long long)size);
    if (size % 512)
        return vd_err(-EINVAL, "%s: the new size must be a multiple of 512", s->fname);
    if (size < s->size) {
        /* only over clusters that hold nothing */
        uint64_t first = (size + s->cs - 1) >> s->cluster_bits;
        for (uint64_t c = first; (c << s->cluster_bits) < s->size; c++) {
            uint8_t *tbl;
            if ((r = vd_q2_l2_table(s, c >> s->l2_bits, false, &tbl)) < 0)
                return r;
            if (!tbl) {
                c = ((c >> s->l2_bits) + 1) << s->l2_bits;
                c--;
                continue;
            }
            uint64_t idx = c & (s->l2_entries - 1);
            uint64_t e = q2_l2_entry(s, tbl, idx), bm = q2_l2_bitmap(s, tbl, idx);
            if ((e & Q2_COMPRESSED) || (e & Q2_OFF_MASK) || (s->ext_l2 && (uint32_t)bm))
                return vd_err(-ENOTSUP, "%s: cannot shrink to %llu bytes: guest offset 0x%llx holds data",
                              s->fname, (unsigned long long)size, (unsigned long long)(c << s->cluster_bits));
        }
        if ((r = vd_q2_flush_all(s)) < 0)
            return r;
        return write_size(s, size);
    }
    uint64_t per_l1 = s->cs * s->l2_entries, need = (size + per_l1 - 1) / per_l1;
    if (need > s->l1_size && (r = grow_l1(s, need)) < 0)
        return r;
    /* bytes past the old end inside its last cluster must read as zeros */
    uint64_t old = s->size;
    if (old & (s->cs - 1)) {
        struct vd_map m;
        if ((r = vd_q2_map(l, old - 1, 1, 0, &m)) < 0)
            return r;
        if (m.kind == VD_MAP_DATA) {
            uint64_t tail = s->cs - (old & (s->cs - 1));
            if ((r = vd_file_zero(s->f, m.host_off + 1, tail)) < 0)
                return r;
        }
    }
    if ((r = vd_q2_flush_all(s)) < 0 || (r = write_size(s, size)) < 0)
        return r;
    if (prealloc != VD_PREALLOC_OFF) {
        uint64_t from = (old + s->cs - 1) & ~(s->cs - 1);
        if (from < size && (r = vd_q2_preallocate(s, from, size - from, prealloc)) < 0)
            return r;
    }
    return 0;
}
