/* VMDK hosted sparse extents (header versions 1, 2 and 3) and ESX COWD
 * extents: header, grain directory (and its redundant copy), grain tables,
 * compressed grains. A grain table entry (GTE) is 0 (not here: the parent
 * or zeros), 1 (a zeroed grain, with the version-2 flag) or the sector of
 * the grain (of its marker, when grains are compressed). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <libdeflate.h>
#include "vdisk/error.h"
#include "formats/vmdk/vmdk.h"

#define COWD_GTES 4096u

void vd_vmdk_sparse_free(struct vmdk_sparse *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < s->gd_n; i++) {
        if (s->gt)
            free(s->gt[i]);
        if (s->rgt)
            free(s->rgt[i]);
    }
    free(s->gt);
    free(s->rgt);
    free(s->gd);
    free(s->rgd);
    free(s->gt_dirty);
    free(s->pend);
    free(s);
}

static bool pow2(uint64_t x) { return x && !(x & (x - 1)); }

/* Validate a VMDK4 header; sets nothing. */
static int check_header(const char *name, const uint8_t *h, uint64_t at, bool footer)
{
    uint32_t ver = le32(h + VH_VERSION), flags = le32(h + VH_FLAGS);
    uint64_t grain = le64(h + VH_GRAIN), cap = le64(h + VH_CAPACITY);
    uint32_t gtes = le32(h + VH_NUM_GTES);
    if (le32(h + VH_MAGIC) != VMDK_MAGIC)
        return vd_err(-EINVAL, "%s: no sparse extent header (magic KDMV) at offset %llu", name,
                      (unsigned long long)at);
    if (ver < 1 || ver > 3)
        return vd_err(-ENOTSUP, "%s: unsupported sparse extent version %u at offset %llu", name, ver,
                      (unsigned long long)at + VH_VERSION);
    if (!pow2(grain) || grain < 8 || grain > 0x4000)
        return vd_err(-EINVAL, "%s: bad grain size %llu sectors at offset %llu (a power of two from "
                      "8 to 16384 expected)", name, (unsigned long long)grain,
                      (unsigned long long)at + VH_GRAIN);
    if (gtes == 0 || gtes > 4096)
        return vd_err(-EINVAL, "%s: bad grain table size %u at offset %llu", name, gtes,
                      (unsigned long long)at + VH_NUM_GTES);
    if (cap == 0 || cap > (1ull << 40))
        return vd_err(-EINVAL, "%s: bad capacity %llu sectors at offset %llu", name,
                      (unsigned long long)cap, (unsigned long long)at + VH_CAPACITY);
    if ((flags & VMDK_FLAG_NL_TEST) &&
        memcmp(h + VH_NL_CHARS, "\n \r\n", 4) != 0)
        return vd_err(-EINVAL, "%s: the header's newline test bytes are damaged (the file was "
                      "transferred in text mode?)", name);
    if ((flags & VMDK_FLAG_COMPRESS) && le32(h + VH_COMPRESS) % 65536 != 1)
        return vd_err(-ENOTSUP, "%s: unsupported grain compression %u", name,
                      (unsigned)(le32(h + VH_COMPRESS) & 0xffff));
    if (footer && le64(h + VH_GD_OFF) == VMDK_GD_AT_END)
        return vd_err(-EINVAL, "%s: the footer at offset %llu does not say where the grain "
                      "directory is", name, (unsigned long long)at);
    return 0;
}

int vd_vmdk_sparse_header(const char *name, struct vd_file *f, uint8_t *hdr, uint64_t fsize)
{
    int r = vd_file_pread(f, hdr, VMDK_SECTOR, 0);
    if (r < 0)
        return vd_err(r, "%s: cannot read the sparse header", name);
    r = check_header(name, hdr, 0, false);
    if (r < 0)
        return r;
    if (le64(hdr + VH_GD_OFF) != VMDK_GD_AT_END)
        return 0;
    /* streamOptimized: the real header is the footer, 1 KiB before the end. */
    if (fsize < 3 * VMDK_SECTOR)
        return vd_err(-EINVAL, "%s: streamOptimized file without a footer", name);
    uint8_t foot[VMDK_SECTOR];
    r = vd_file_pread(f, foot, VMDK_SECTOR, fsize - 2 * VMDK_SECTOR);
    if (r < 0)
        return vd_err(r, "%s: cannot read the footer", name);
    r = check_header(name, foot, fsize - 2 * VMDK_SECTOR, true);
    if (r < 0)
        return vd_err(r, "%s: streamOptimized file has no valid footer (incomplete or truncated "
                      "stream?): %s", name, vd_errmsg(r));
    memcpy(hdr, foot, VMDK_SECTOR);
    return 0;
}

static int load_dir(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t off_sec,
                    uint32_t **out, const char *what)
{
    uint64_t bytes = (uint64_t)s->gd_n * 4;
    uint64_t off = off_sec * VMDK_SECTOR;
    if (off_sec == 0 || off_sec > s->fsize / VMDK_SECTOR || s->fsize - off < bytes)
        return vd_err(-EINVAL, "%s: %s at sector %llu (%llu bytes) lies outside the file", name, what,
                      (unsigned long long)off_sec, (unsigned long long)bytes);
    uint32_t *d = malloc(bytes);
    if (!d)
        return -ENOMEM;
    int r = vd_file_pread(f, d, bytes, off);
    if (r < 0) {
        free(d);
        return vd_err(r, "%s: cannot read the %s at offset %llu", name, what, (unsigned long long)off);
    }
    uint64_t gt_bytes = (uint64_t)s->gtes * 4;
    for (uint32_t i = 0; i < s->gd_n; i++) {
        d[i] = le32(&d[i]);
        if (d[i] && ((uint64_t)d[i] * VMDK_SECTOR + gt_bytes > s->fsize)) {
            uint32_t bad = d[i];
            free(d);
            return vd_err(-EINVAL, "%s: %s entry %u points at sector %u, past the end of the file",
                          name, what, i, bad);
        }
    }
    *out = d;
    return 0;
}

static int open_cowd(const char *name, struct vd_file *f, struct vmdk_sparse *s, const uint8_t *h)
{
    /* ESX COWD: magic, version, flags, numSectors, grainSize, gdOffset,
     * numGDEntries, freeSector (all u32, sectors). */
    s->cowd = true;
    s->version = le32(h + 4);
    s->capacity = le32(h + 12);
    s->grain = le32(h + 16);
    s->gd_off = le32(h + 20);
    s->gd_n = le32(h + 24);
    s->gtes = COWD_GTES;
    if (s->version != 1)
        return vd_err(-ENOTSUP, "%s: unsupported COWD version %u", name, s->version);
    if (!pow2(s->grain) || s->grain > 0x4000 || s->capacity == 0)
        return vd_err(-EINVAL, "%s: bad COWD grain size %llu or capacity %llu", name,
                      (unsigned long long)s->grain, (unsigned long long)s->capacity);
    uint64_t need = ((s->capacity + s->grain - 1) / s->grain + COWD_GTES - 1) / COWD_GTES;
    if (s->gd_n < need || s->gd_n > (1u << 24))
        return vd_err(-EINVAL, "%s: COWD directory has %u entries, %llu needed", name, s->gd_n,
                      (unsigned long long)need);
    return load_dir(name, f, s, s->gd_off, &s->gd, "grain directory");
}

int vd_vmdk_sparse_open(const char *name, struct vd_file *f, struct vmdk_sparse **out)
{
    struct vmdk_sparse *s = calloc(1, sizeof(*s));
    uint8_t *h;
    int r;
    if (!s)
        return -ENOMEM;
    h = s->header;
    r = vd_file_size(f, &s->fsize);
    if (r < 0) {
        r = vd_err(r, "%s: cannot get the size", name);
        goto fail;
    }
    r = vd_file_pread(f, h, VMDK_SECTOR, 0);
    if (r < 0) {
        r = vd_err(r, "%s: cannot read the sparse header", name);
        goto fail;
    }
    if (le32(h) == VMDK_COWD_MAGIC) {
        r = open_cowd(name, f, s, h);
        if (r < 0)
            goto fail;
    } else {
        r = vd_vmdk_sparse_header(name, f, h, s->fsize);
        if (r < 0)
            goto fail;
        s->version = le32(h + VH_VERSION);
        s->flags = le32(h + VH_FLAGS);
        s->capacity = le64(h + VH_CAPACITY);
        s->grain = le64(h + VH_GRAIN);
        s->gtes = le32(h + VH_NUM_GTES);
        s->gd_off = le64(h + VH_GD_OFF);
        s->rgd_off = (s->flags & VMDK_FLAG_RGD) ? le64(h + VH_RGD_OFF) : 0;
        s->desc_off = le64(h + VH_DESC_OFF);
        s->desc_size = le64(h + VH_DESC_SIZE);
        s->compressed = s->flags & VMDK_FLAG_COMPRESS;
        s->markers = s->flags & VMDK_FLAG_MARKERS;
        s->zero_gte = s->version >= 2 && (s->flags & VMDK_FLAG_ZERO_GTE);
        uint64_t grains = (s->capacity + s->grain - 1) / s->grain;
        uint64_t n = (grains + s->gtes - 1) / s->gtes;
        if (n > (1u << 26)) {
            r = vd_err(-EINVAL, "%s: grain directory of %llu entries is implausible", name,
                       (unsigned long long)n);
            goto fail;
        }
        s->gd_n = (uint32_t)n;
        r = load_dir(name, f, s, s->gd_off, &s->gd, "grain directory");
        if (r >= 0 && s->rgd_off)
            r = load_dir(name, f, s, s->rgd_off, &s->rgd, "redundant grain directory");
        if (r < 0)
            goto fail;
    }
    s->gt = calloc(s->gd_n, sizeof(*s->gt));
    s->rgt = calloc(s->gd_n, sizeof(*s->rgt));
    if (!s->gt || !s->rgt) {
        r = -ENOMEM;
        goto fail;
    }
    s->next = (s->fsize + VMDK_SECTOR - 1) / VMDK_SECTOR * VMDK_SECTOR;
    *out = s;
    return 0;
fail:
    vd_vmdk_sparse_free(s);
    return r;
}

static int load_gt(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint32_t di,
                   uint32_t **slot, uint32_t sector)
{
    uint64_t bytes = (uint64_t)s->gtes * 4;
    uint32_t *t = malloc(bytes);
    if (!t)
        return -ENOMEM;
    int r = vd_file_pread(f, t, bytes, (uint64_t)sector * VMDK_SECTOR);
    if (r < 0) {
        free(t);
        return vd_err(r, "%s: cannot read grain table %u at sector %u", name, di, sector);
    }
    for (uint32_t i = 0; i < s->gtes; i++)
        t[i] = le32(&t[i]);
    *slot = t;
    return 0;
}

int vd_vmdk_sparse_gte(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t g, uint32_t *gte)
{
    uint64_t di = g / s->gtes;
    if (di >= s->gd_n)
        return vd_err(-EIO, "%s: grain %llu is beyond the grain directory", name, (unsigned long long)g);
    if (!s->gt[di]) {
        if (!s->gd[di]) {
            *gte = 0;
            return 0;
        }
        int r = load_gt(name, f, s, (uint32_t)di, &s->gt[di], s->gd[di]);
        if (r < 0)
            return r;
    }
    uint32_t e = s->gt[di][g % s->gtes];
    if (e > 1 || (e == 1 && !s->zero_gte)) {
        /* The grain must start inside the file (a short last grain reads
         * as zeros past the end). */
        uint64_t lim = s->fsize > s->next ? s->fsize : s->next;
        if ((uint64_t)e * VMDK_SECTOR >= lim)
            return vd_err(-EINVAL, "%s: grain table entry for grain %llu points at sector %u, past "
                          "the end of the file", name, (unsigned long long)g, e);
        if (e == 1 || (uint64_t)e * VMDK_SECTOR < (s->compressed ? VMDK_SECTOR : 2 * VMDK_SECTOR))
            return vd_err(-EINVAL, "%s: grain table entry for grain %llu points at sector %u, "
                          "inside the header", name, (unsigned long long)g, e);
    }
    *gte = e;
    return 0;
}

/* Room for a new grain table at the end of the extent; written by
 * vd_vmdk_sparse_write_links. */
static int reserve_table(const char *name, struct vmdk_sparse *s, uint32_t *sector)
{
    uint64_t bytes = ((uint64_t)s->gtes * 4 + VMDK_SECTOR - 1) / VMDK_SECTOR * VMDK_SECTOR;
    uint64_t at = s->next;
    if (at / VMDK_SECTOR > 0xFFFFFFFFu)
        return vd_err(-EFBIG, "%s: the extent outgrew 2 TiB of sectors", name);
    s->next += bytes;
    *sector = (uint32_t)(at / VMDK_SECTOR);
    return 0;
}

/* One directory (primary or redundant): make sure the table exists, set the
 * entry, in memory; mark what vd_vmdk_sparse_write_links must write. */
static int link_one(const char *name, struct vd_file *f, struct vmdk_sparse *s, bool red, uint64_t g,
                    uint32_t sector)
{
    uint32_t *dir = red ? s->rgd : s->gd;
    uint32_t **tables = red ? s->rgt : s->gt;
    uint32_t di = (uint32_t)(g / s->gtes), ti = (uint32_t)(g % s->gtes);
    int r;
    if (!dir[di]) {
        uint32_t *t = calloc(s->gtes, 4), ts = 0;
        if (!t)
            return -ENOMEM;
        if ((r = reserve_table(name, s, &ts)) < 0) {
            free(t);
            return r;
        }
        free(tables[di]);
        tables[di] = t;
        dir[di] = ts;
        s->pend[di] |= red ? VMDK_PEND_RGD : VMDK_PEND_GD;
    } else if (!tables[di]) {
        if ((r = load_gt(name, f, s, di, &tables[di], dir[di])) < 0)
            return r;
    }
    tables[di][ti] = sector;
    s->pend[di] |= red ? VMDK_PEND_RGT : VMDK_PEND_GT;
    s->any_pend = true;
    return 0;
}

int vd_vmdk_sparse_link(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t g, uint32_t sector)
{
    if (!s->pend && !(s->pend = calloc(s->gd_n ? s->gd_n : 1, 1)))
        return -ENOMEM;
    if (s->rgd) {
        int r = link_one(name, f, s, true, g, sector);
        if (r < 0)
            return r;
    }
    return link_one(name, f, s, false, g, sector);
}

/* Write the changed tables, then the new directory entries, each set with
 * the redundant copy first (after a crash the primary is the one read, and
 * it is never ahead of its backup). Syncs order it for a power loss: the
 * grains a table points at, and the file's growth over them, are durable
 * before the table is written (else a table could survive pointing past
 * the end of the file); a new table is durable before a directory entry
 * points at it. The caller's flush makes the rest durable. */
int vd_vmdk_sparse_write_links(const char *name, struct vd_file *f, struct vmdk_sparse *s)
{
    if (!s->any_pend)
        return 0;
    int r = vd_file_sync(f);
    if (r < 0)
        return vd_err(r, "%s: sync before writing grain tables failed", name);
    uint64_t bytes = (uint64_t)s->gtes * 4;
    uint8_t *b = malloc(bytes);
    if (!b)
        return -ENOMEM;
    bool dirs = false;
    for (int red = 1; red >= 0; red--) {
        uint8_t bit = red ? VMDK_PEND_RGT : VMDK_PEND_GT;
        uint32_t *dir = red ? s->rgd : s->gd;
        uint32_t **tables = red ? s->rgt : s->gt;
        for (uint32_t di = 0; dir && di < s->gd_n; di++) {
            dirs |= (s->pend[di] & (VMDK_PEND_GD | VMDK_PEND_RGD)) != 0;
            if (!(s->pend[di] & bit))
                continue;
            for (uint32_t i = 0; i < s->gtes; i++)
                put_le32(b + 4 * (uint64_t)i, tables[di][i]);
            uint64_t at = (uint64_t)dir[di] * VMDK_SECTOR;
            if ((r = vd_file_pwrite(f, b, bytes, at)) < 0) {
                free(b);
                return vd_err(r, "%s: cannot write grain table %u at sector %u", name, di, dir[di]);
            }
            if (at + bytes > s->fsize)
                s->fsize = at + bytes;
            s->pend[di] &= (uint8_t)~bit;
        }
    }
    free(b);
    if (dirs && (r = vd_file_sync(f)) < 0)
        return vd_err(r, "%s: sync before writing grain directory entries failed", name);
    for (int red = 1; dirs && red >= 0; red--) {
        uint8_t bit = red ? VMDK_PEND_RGD : VMDK_PEND_GD;
        uint32_t *dir = red ? s->rgd : s->gd;
        uint64_t off = red ? s->rgd_off : s->gd_off;
        for (uint32_t di = 0; dir && di < s->gd_n; di++) {
            if (!(s->pend[di] & bit))
                continue;
            uint8_t d[4];
            put_le32(d, dir[di]);
            if ((r = vd_file_pwrite(f, d, 4, off * VMDK_SECTOR + (uint64_t)di * 4)) < 0)
                return vd_err(r, "%s: cannot write grain directory entry %u", name, di);
            s->pend[di] &= (uint8_t)~bit;
        }
    }
    s->any_pend = false;
    return 0;
}

int vd_vmdk_read_grain(const char *name, struct vd_file *f, uint64_t host_off, uint32_t comp_len,
                    uint64_t expect_lba, void *buf, size_t unit)
{
    uint8_t hdr[12];
    int r = vd_file_pread(f, hdr, 12, host_off);
    if (r < 0)
        return vd_err(r, "%s: cannot read the grain marker at offset %llu", name,
                      (unsigned long long)host_off);
    uint64_t lba = le64(hdr);
    uint32_t size = le32(hdr + 8);
    if (lba != expect_lba)
        return vd_err(-EINVAL, "%s: compressed grain at offset %llu is for sector %llu, not %llu",
                      name, (unsigned long long)host_off, (unsigned long long)lba,
                      (unsigned long long)expect_lba);
    if (size == 0 || size > comp_len)
        return vd_err(-EINVAL, "%s: compressed grain at offset %llu has a bad size %u", name,
                      (unsigned long long)host_off, size);
    uint8_t *in = malloc(size);
    if (!in)
        return -ENOMEM;
    r = vd_file_pread(f, in, size, host_off + 12);
    if (r < 0) {
        free(in);
        return vd_err(r, "%s: cannot read the compressed grain at offset %llu", name,
                      (unsigned long long)host_off);
    }
    struct libdeflate_decompressor *d = libdeflate_alloc_decompressor();
    size_t got = 0;
    enum libdeflate_result res = d ? libdeflate_zlib_decompress(d, in, size, buf, unit, &got)
                                   : LIBDEFLATE_BAD_DATA;
    if (d)
        libdeflate_free_decompressor(d);
    free(in);
    if (!d)
        return -ENOMEM;
    if (res != LIBDEFLATE_SUCCESS)
        return vd_err(-EINVAL, "%s: compressed grain at offset %llu does not inflate (%s)", name,
                      (unsigned long long)host_off,
                      res == LIBDEFLATE_INSUFFICIENT_SPACE ? "larger than a grain" : "bad data");
    if (got < unit)
        memset((uint8_t *)buf + got, 0, unit - got);
    return 0;
}

/* A new hosted sparse extent: header, embedded descriptor (if any), the
 * redundant and primary grain directories with all their tables, the data
 * area starting at a grain boundary. */
int vd_vmdk_sparse_write_new(struct vd_file *f, uint64_t capacity, uint32_t version, uint32_t flags,
                          const char *desc, size_t desc_len, const char *name)
{
    uint64_t grain = VMDK_DEFAULT_GRAIN, gtes = VMDK_GTES;
    uint64_t grains = (capacity + grain - 1) / grain;
    uint64_t gd_n = (grains + gtes - 1) / gtes;
    uint64_t gd_sec = (gd_n * 4 + VMDK_SECTOR - 1) / VMDK_SECTOR;
    uint64_t gt_sec = gtes * 4 / VMDK_SECTOR;
    uint64_t desc_off = desc ? 1 : 0, desc_size = desc ? 20 : 0;
    while (desc && desc_size * VMDK_SECTOR < desc_len + 1)
        desc_size += 20;
    uint64_t rgd = 1 + desc_size;
    uint64_t gd = rgd + gd_sec + gd_n * gt_sec;
    uint64_t overhead = gd + gd_sec + gd_n * gt_sec;
    overhead = (overhead + grain - 1) / grain * grain;
    if (overhead > 0xFFFFFFFFull)
        return vd_err(-EFBIG, "%s: the extent is too large for a sparse VMDK", name);
    uint8_t h[VMDK_SECTOR] = { 0 };
    put_le32(h + VH_MAGIC, VMDK_MAGIC);
    put_le32(h + VH_VERSION, version);
    put_le32(h + VH_FLAGS, flags);
    put_le64(h + VH_CAPACITY, capacity);
    put_le64(h + VH_GRAIN, grain);
    put_le64(h + VH_DESC_OFF, desc_off);
    put_le64(h + VH_DESC_SIZE, desc_size);
    put_le32(h + VH_NUM_GTES, (uint32_t)gtes);
    put_le64(h + VH_RGD_OFF, rgd);
    put_le64(h + VH_GD_OFF, gd);
    put_le64(h + VH_OVERHEAD, overhead);
    memcpy(h + VH_NL_CHARS, "\n \r\n", 4);
    size_t meta = (size_t)((overhead - 1) * VMDK_SECTOR);
    uint8_t *m = calloc(1, meta);
    if (!m)
        return -ENOMEM;
    if (desc)
        memcpy(m, desc, desc_len);
    for (int copy = 0; copy < 2; copy++) {
        uint64_t dir = copy ? gd : rgd;
        uint8_t *p = m + (dir - 1) * VMDK_SECTOR;
        for (uint64_t i = 0; i < gd_n; i++)
            put_le32(p + i * 4, (uint32_t)(dir + gd_sec + i * gt_sec));
    }
    int r = vd_file_pwrite(f, h, sizeof(h), 0);
    if (r >= 0)
        r = vd_file_pwrite(f, m, meta, VMDK_SECTOR);
    free(m);
    return r < 0 ? vd_err(r, "%s: cannot write the sparse extent's metadata", name) : 0;
}
