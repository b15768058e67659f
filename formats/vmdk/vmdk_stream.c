/* streamOptimized writer. The file is written front to back: header and
 * descriptor, then each grain compressed behind a grain marker, a grain
 * table (behind its marker) once the stream moves past the tables' range,
 * and at the end the grain directory, a footer (a copy of the header that
 * says where the directory is) and the end-of-stream marker. The header at
 * offset 0 says "directory at the end" (gdOffset = all ones), as VMware
 * writes it. Grains are never rewritten: the format is append-only.
 *
 * Every flush writes the pending tables, directory, footer and EOS marker
 * behind the last grain without moving the append point, so the file is a
 * complete stream after each flush and the next grain overwrites that tail. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <libdeflate.h>
#include "vdisk/error.h"
#include "formats/vmdk/vmdk.h"

/* zlib level 3: near level 6's ratio on disk images at a fraction of the time. */
#define VMDK_ZLEVEL 3

static pthread_key_t comp_key;
static pthread_once_t comp_once = PTHREAD_ONCE_INIT;
static void comp_free(void *c) { libdeflate_free_compressor(c); }
static void comp_init(void) { pthread_key_create(&comp_key, comp_free); }

static struct libdeflate_compressor *compressor(void)
{
    pthread_once(&comp_once, comp_init);
    struct libdeflate_compressor *c = pthread_getspecific(comp_key);
    if (!c) {
        c = libdeflate_alloc_compressor(VMDK_ZLEVEL);
        if (c)
            pthread_setspecific(comp_key, c);
    }
    return c;
}

int vd_vmdk_deflate(const void *in, size_t len, size_t grain_bytes, void *out, size_t cap, size_t *n)
{
    struct libdeflate_compressor *c = compressor();
    if (!c)
        return -ENOMEM;
    const void *src = in;
    uint8_t *pad = NULL;
    if (len < grain_bytes) {
        pad = calloc(1, grain_bytes);
        if (!pad)
            return -ENOMEM;
        memcpy(pad, in, len);
        src = pad;
    }
    *n = libdeflate_zlib_compress(c, src, grain_bytes, out, cap);
    free(pad);
    return *n ? 0 : -ENOSPC;
}

int vd_vmdk_frame_grain(uint64_t lba, const void *z, size_t zlen, uint8_t **blob, size_t *blob_len)
{
    size_t total = (12 + zlen + VMDK_SECTOR - 1) / VMDK_SECTOR * VMDK_SECTOR;
    uint8_t *out = malloc(total);
    if (!out)
        return -ENOMEM;
    put_le64(out, lba);
    put_le32(out + 8, (uint32_t)zlen);
    memcpy(out + 12, z, zlen);
    memset(out + 12 + zlen, 0, total - 12 - zlen);
    *blob = out;
    *blob_len = total;
    return 0;
}

int vd_vmdk_compress_grain(const void *data, size_t len, size_t grain_bytes, uint64_t lba,
                        uint8_t **blob, size_t *blob_len)
{
    struct libdeflate_compressor *c = compressor();
    if (!c)
        return -ENOMEM;
    const void *src = data;
    uint8_t *pad = NULL;
    if (len < grain_bytes) {
        /* Readers expect a whole grain: pad the disk's last, partial one. */
        pad = calloc(1, grain_bytes);
        if (!pad)
            return -ENOMEM;
        memcpy(pad, data, len);
        src = pad;
    }
    size_t bound = libdeflate_zlib_compress_bound(c, grain_bytes);
    size_t cap = (12 + bound + VMDK_SECTOR - 1) / VMDK_SECTOR * VMDK_SECTOR;
    uint8_t *out = malloc(cap);
    if (!out) {
        free(pad);
        return -ENOMEM;
    }
    size_t n = libdeflate_zlib_compress(c, src, grain_bytes, out + 12, bound);
    free(pad);
    if (n == 0) {
        free(out);
        return -EIO;
    }
    put_le64(out, lba);
    put_le32(out + 8, (uint32_t)n);
    size_t total = (12 + n + VMDK_SECTOR - 1) / VMDK_SECTOR * VMDK_SECTOR;
    memset(out + 12 + n, 0, total - 12 - n);
    *blob = out;
    *blob_len = total;
    return 0;
}

static void marker(uint8_t *m, uint64_t sectors, uint32_t type)
{
    memset(m, 0, VMDK_SECTOR);
    put_le64(m, sectors);
    put_le32(m + 12, type);
}

static uint64_t gt_sectors(const struct vmdk_sparse *s)
{
    return ((uint64_t)s->gtes * 4 + VMDK_SECTOR - 1) / VMDK_SECTOR;
}

/* Write marker + grain table di at *pos; returns its sector in *sector. */
static int put_table(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint32_t di,
                     uint64_t *pos, uint32_t *sector)
{
    uint64_t n = gt_sectors(s);
    size_t bytes = (size_t)((n + 1) * VMDK_SECTOR);
    uint8_t *b = calloc(1, bytes);
    if (!b)
        return -ENOMEM;
    marker(b, n, VMDK_MARKER_GT);
    for (uint32_t i = 0; i < s->gtes; i++)
        put_le32(b + VMDK_SECTOR + i * 4, s->gt[di] ? s->gt[di][i] : 0);
    int r = vd_file_pwrite(f, b, bytes, *pos);
    free(b);
    if (r < 0)
        return vd_err(r, "%s: cannot write grain table %u at offset %llu", name, di,
                      (unsigned long long)*pos);
    *sector = (uint32_t)(*pos / VMDK_SECTOR + 1);
    *pos += bytes;
    return 0;
}

static void make_header(uint8_t *h, const struct vmdk_sparse *s, uint64_t gd_sector)
{
    memcpy(h, s->header, VMDK_SECTOR);
    put_le32(h + VH_VERSION, 3);
    put_le32(h + VH_FLAGS, VMDK_FLAG_NL_TEST | VMDK_FLAG_COMPRESS | VMDK_FLAG_MARKERS);
    put_le64(h + VH_RGD_OFF, 0);
    put_le64(h + VH_GD_OFF, gd_sector);
    memcpy(h + VH_NL_CHARS, "\n \r\n", 4);
    put_le16(h + VH_COMPRESS, 1);
}

/* The tail: dirty tables, directory, footer, EOS. pos is not moved. */
static int write_tail(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t pos)
{
    uint32_t *gd = malloc((size_t)s->gd_n * 4);
    if (!gd)
        return -ENOMEM;
    memcpy(gd, s->gd, (size_t)s->gd_n * 4);
    int r = 0;
    for (uint32_t i = 0; i < s->gd_n && r >= 0; i++)
        if (s->gt_dirty[i])
            r = put_table(name, f, s, i, &pos, &gd[i]);
    if (r < 0) {
        free(gd);
        return r;
    }
    uint64_t gd_sec = ((uint64_t)s->gd_n * 4 + VMDK_SECTOR - 1) / VMDK_SECTOR;
    size_t bytes = (size_t)((gd_sec + 1 + 3) * VMDK_SECTOR);
    uint8_t *b = calloc(1, bytes);
    if (!b) {
        free(gd);
        return -ENOMEM;
    }
    marker(b, gd_sec, VMDK_MARKER_GD);
    for (uint32_t i = 0; i < s->gd_n; i++)
        put_le32(b + VMDK_SECTOR + i * 4, gd[i]);
    free(gd);
    uint8_t *t = b + (gd_sec + 1) * VMDK_SECTOR;
    marker(t, 1, VMDK_MARKER_FOOTER);
    make_header(t + VMDK_SECTOR, s, pos / VMDK_SECTOR + 1);
    marker(t + 2 * VMDK_SECTOR, 0, VMDK_MARKER_EOS);
    r = vd_file_pwrite(f, b, bytes, pos);
    free(b);
    if (r < 0)
        return vd_err(r, "%s: cannot write the stream's directory and footer at offset %llu", name,
                      (unsigned long long)pos);
    uint64_t end = pos + bytes;
    r = vd_file_truncate(f, end);
    if (r < 0)
        return vd_err(r, "%s: cannot truncate the stream at %llu", name, (unsigned long long)end);
    s->fsize = end;
    return 0;
}

int vd_vmdk_stream_new(struct vd_file *f, uint64_t capacity, const char *desc, size_t desc_len,
                    const char *name)
{
    uint64_t desc_size = 20;
    while (desc_size * VMDK_SECTOR < desc_len + 1)
        desc_size += 20;
    uint64_t overhead = (1 + desc_size + VMDK_DEFAULT_GRAIN - 1) / VMDK_DEFAULT_GRAIN * VMDK_DEFAULT_GRAIN;
    struct vmdk_sparse s = { 0 };
    uint8_t *h = s.header;
    put_le32(h + VH_MAGIC, VMDK_MAGIC);
    put_le64(h + VH_CAPACITY, capacity);
    put_le64(h + VH_GRAIN, VMDK_DEFAULT_GRAIN);
    put_le64(h + VH_DESC_OFF, 1);
    put_le64(h + VH_DESC_SIZE, desc_size);
    put_le32(h + VH_NUM_GTES, VMDK_GTES);
    put_le64(h + VH_OVERHEAD, overhead);
    s.gtes = VMDK_GTES;
    s.gd_n = (uint32_t)(((capacity + VMDK_DEFAULT_GRAIN - 1) / VMDK_DEFAULT_GRAIN + VMDK_GTES - 1) / VMDK_GTES);
    uint8_t hdr[VMDK_SECTOR];
    make_header(hdr, &s, VMDK_GD_AT_END);
    size_t meta = (size_t)(overhead * VMDK_SECTOR);
    uint8_t *m = calloc(1, meta);
    s.gd = calloc(s.gd_n ? s.gd_n : 1, 4);
    s.gt_dirty = calloc(s.gd_n ? s.gd_n : 1, 1);
    int r = -ENOMEM;
    if (m && s.gd && s.gt_dirty) {
        memcpy(m, hdr, VMDK_SECTOR);
        memcpy(m + VMDK_SECTOR, desc, desc_len);
        r = vd_file_pwrite(f, m, meta, 0);
        if (r < 0)
            r = vd_err(r, "%s: cannot write the stream header", name);
        else
            r = write_tail(name, f, &s, meta);
    }
    free(m);
    free(s.gd);
    free(s.gt_dirty);
    return r;
}

int vd_vmdk_stream_begin(const char *name, struct vd_file *f, struct vmdk_sparse *s)
{
    if (s->stream)
        return 0;
    if (s->gtes * 4 % VMDK_SECTOR)
        return vd_err(-ENOTSUP, "%s: cannot append to a stream whose grain tables are not whole sectors",
                      name);
    s->gt_dirty = calloc(s->gd_n ? s->gd_n : 1, 1);
    if (!s->gt_dirty)
        return -ENOMEM;
    /* Append over the tail: the directory if it directly precedes the
     * footer marker, else the footer marker, else the end. */
    uint64_t end = s->fsize / VMDK_SECTOR * VMDK_SECTOR;
    uint64_t pos = (s->fsize + VMDK_SECTOR - 1) / VMDK_SECTOR * VMDK_SECTOR;
    uint8_t m[VMDK_SECTOR];
    if (s->markers && end >= 3 * VMDK_SECTOR &&
        vd_file_pread(f, m, VMDK_SECTOR, end - 3 * VMDK_SECTOR) >= 0 &&
        le32(m + 8) == 0 && le32(m + 12) == VMDK_MARKER_FOOTER) {
        pos = end - 3 * VMDK_SECTOR;
        uint64_t gd_sec = ((uint64_t)s->gd_n * 4 + VMDK_SECTOR - 1) / VMDK_SECTOR;
        uint64_t gdm = (s->gd_off - 1) * VMDK_SECTOR;
        if (s->gd_off >= 2 && gdm + (gd_sec + 1) * VMDK_SECTOR == pos &&
            vd_file_pread(f, m, VMDK_SECTOR, gdm) >= 0 && le32(m + 12) == VMDK_MARKER_GD &&
            le32(m + 8) == 0)
            pos = gdm;
    }
    uint64_t overhead = le64(s->header + VH_OVERHEAD) * VMDK_SECTOR;
    if (pos < overhead)
        pos = overhead;
    s->next = pos;
    s->stream = true;
    s->last_lba = 0;
    /* The redundant directory is not kept in a stream. */
    s->rgd_off = 0;
    free(s->rgd);
    s->rgd = NULL;
    return 0;
}

int vd_vmdk_stream_append(const char *name, struct vd_file *f, struct vmdk_sparse *s, uint64_t g,
                       const uint8_t *blob, size_t blob_len)
{
    uint32_t di = (uint32_t)(g / s->gtes);
    int r;
    /* Moving past earlier tables: write them behind their grains. */
    for (uint32_t i = 0; i < di; i++) {
        if (!s->gt_dirty[i])
            continue;
        uint32_t sec;
        r = put_table(name, f, s, i, &s->next, &sec);
        if (r < 0)
            return r;
        s->gd[i] = sec;
        s->gt_dirty[i] = 0;
    }
    if (!s->gt[di]) {
        if (s->gd[di]) {
            uint32_t e;
            r = vd_vmdk_sparse_gte(name, f, s, g, &e);
            if (r < 0)
                return r;
        } else {
            s->gt[di] = calloc(s->gtes, 4);
            if (!s->gt[di])
                return -ENOMEM;
        }
    }
    if (s->next / VMDK_SECTOR > 0xFFFFFFFFull)
        return vd_err(-EFBIG, "%s: the stream outgrew 2 TiB", name);
    r = vd_file_pwrite(f, blob, blob_len, s->next);
    if (r < 0)
        return vd_err(r, "%s: cannot write a compressed grain at offset %llu", name,
                      (unsigned long long)s->next);
    s->gt[di][g % s->gtes] = (uint32_t)(s->next / VMDK_SECTOR);
    s->gt_dirty[di] = 1;
    s->next += blob_len;
    if (s->next > s->fsize)
        s->fsize = s->next;
    s->stream_dirty = true;
    return 0;
}

int vd_vmdk_stream_finish(const char *name, struct vd_file *f, struct vmdk_sparse *s)
{
    if (!s->stream || !s->stream_dirty)
        return 0;
    int r = write_tail(name, f, s, s->next);
    if (r < 0)
        return r;
    /* The header at 0 now says "directory at the end", like VMware's. */
    uint8_t h[VMDK_SECTOR];
    make_header(h, s, VMDK_GD_AT_END);
    r = vd_file_pwrite(f, h, VMDK_SECTOR, 0);
    if (r < 0)
        return vd_err(r, "%s: cannot rewrite the stream header", name);
    s->flags = VMDK_FLAG_NL_TEST | VMDK_FLAG_COMPRESS | VMDK_FLAG_MARKERS;
    s->markers = true;
    s->stream_dirty = false;
    return 0;
}
