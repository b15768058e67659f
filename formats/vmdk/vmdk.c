/* VMDK driver: a descriptor (embedded in a sparse extent, or a file of its
 * own) lists extents laid end to end; each maps its range to its own file
 * (FLAT / VMFS: in place; SPARSE / VMFSSPARSE: through grain tables; ZERO:
 * reads as zeros). Delta disks name their parent by parentFileNameHint and
 * its content ID (parentCID); a write changes the disk's CID once per open.
 *
 * Sparse allocation: alloc() reserves a grain at the end of the extent file,
 * the core writes it whole (COW from the parent), commit() links it in the
 * redundant then the primary grain table. Compressed (streamOptimized)
 * extents are append-only: see vmdk_stream.c. */
#include <errno.h>
#include <pthread.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/random.h>
#include "vdisk/error.h"
#include "vdisk/format.h"
#include "formats/vmdk/vmdk.h"

#define MAX_DESC_BYTES (1u << 20)

/* Scratch space for uncompressed writes to a compressed extent: the core
 * writes the grain here, commit compresses and appends it. */
struct vmdk_scratch {
    struct vd_file *f;
    uint8_t *used;
    size_t n;
};
static struct vmdk_scratch *scratch_of(struct vmdk *s);

static const char *lname(struct vd_layer *l) { return l->filename ? l->filename : "?"; }

uint32_t vd_vmdk_new_cid(void)
{
    uint32_t c = 0;
    while (c == 0 || c == 0xFFFFFFFFu || c == 0xFFFFFFFEu)
        if (getrandom(&c, sizeof(c), 0) != sizeof(c))
            c = (uint32_t)rand();
    return c;
}

static bool looks_like_descriptor(const uint8_t *buf, size_t len)
{
    size_t n = len < 1024 ? len : 1024;
    if (n >= 21 && !memcmp(buf, "# Disk DescriptorFile", 21))
        return true;
    for (size_t i = 0; i < n; i++) {
        if (buf[i] == 0)
            break;
        if (buf[i] < 0x09 || (buf[i] > 0x0d && buf[i] < 0x20))
            return false;
    }
    if (n >= 21 && !memcmp(buf, "# Disk DescriptorFile", 21))
        return true;
    return memmem(buf, n, "createType", 10) && memmem(buf, n, "version", 7);
}

static int vmdk_probe(const uint8_t *buf, size_t len, struct vd_file *f)
{
    if (len >= 4 && le32(buf) == VMDK_MAGIC)
        return 100;
    if (looks_like_descriptor(buf, len))
        return 100;
    return 0;
}

int vd_vmdk_read_desc(const char *name, struct vd_file *f, char **text, size_t *len, bool *embedded)
{
    uint8_t h[VMDK_SECTOR];
    uint64_t fsize;
    int r = vd_file_size(f, &fsize);
    if (r < 0)
        return vd_err(r, "%s: cannot get the size", name);
    r = vd_file_pread(f, h, sizeof(h), 0);
    if (r < 0)
        return vd_err(r, "%s: cannot read the first sector", name);
    uint64_t off, n;
    *embedded = false;
    if (le32(h) == VMDK_MAGIC) {
        off = le64(h + VH_DESC_OFF) * VMDK_SECTOR;
        n = le64(h + VH_DESC_SIZE) * VMDK_SECTOR;
        if (off == 0 || n == 0) {
            *text = NULL;     /* a bare sparse extent */
            *len = 0;
            *embedded = true;
            return 0;
        }
        if (n > MAX_DESC_BYTES || off / VMDK_SECTOR != le64(h + VH_DESC_OFF) ||
            n / VMDK_SECTOR != le64(h + VH_DESC_SIZE) || off > fsize ||
            fsize - off < n)
            return vd_err(-EINVAL, "%s: embedded descriptor (offset %llu, %llu bytes) lies outside "
                          "the file or is too large", name, (unsigned long long)off, (unsigned long long)n);
        *embedded = true;
    } else if (le32(h) == VMDK_COWD_MAGIC) {
        return vd_err(-ENOTSUP, "%s: an ESX COWD extent cannot be opened alone; open its descriptor",
                      name);
    } else {
        if (fsize > MAX_DESC_BYTES)
            return vd_err(-EINVAL, "%s: not a VMDK: no sparse header and too large (%llu bytes) for "
                          "a descriptor", name, (unsigned long long)fsize);
        off = 0;
        n = fsize;
    }
    char *t = malloc(n + 1);
    if (!t)
        return -ENOMEM;
    r = vd_file_pread(f, t, n, off);
    if (r < 0) {
        free(t);
        return vd_err(r, "%s: cannot read the descriptor at offset %llu", name, (unsigned long long)off);
    }
    t[n] = 0;
    *text = t;
    *len = n;
    return 0;
}

/* dir of the descriptor + name, unless name is absolute. */
static char *extent_path(const char *desc, const char *name)
{
    char *p;
    if (name[0] == '/')
        return strdup(name);
    const char *slash = strrchr(desc, '/');
    int dl = slash ? (int)(slash - desc) + 1 : 0;
    if (asprintf(&p, "%.*s%s", dl, desc, name) < 0)
        return NULL;
    return p;
}

static void vmdk_close(struct vd_layer *l);

static int open_extents(struct vd_layer *l, struct vmdk *s)
{
    struct vmdk_desc *d = &s->desc;
    s->ext = calloc(d->next, sizeof(*s->ext));
    if (!s->ext)
        return -ENOMEM;
    uint64_t start = 0;
    const char *base = strrchr(lname(l), '/');
    base = base ? base + 1 : lname(l);
    for (size_t i = 0; i < d->next; i++) {
        struct vmdk_desc_extent *de = &d->ext[i];
        struct vmdk_extent *e = &s->ext[i];
        s->next = i + 1;
        e->access = de->access;
        e->type = de->type;
        e->start = start;
        e->sectors = de->sectors;
        e->flat_off = de->offset * VMDK_SECTOR;
        start += de->sectors;
        if (start > (1ull << 44))
            return vd_err(-EFBIG, "%s: extents add up to more than 8 PiB", lname(l));
        if (e->type == VMDK_ZERO || e->access == VMDK_NOACCESS)
            continue;
        int r;
        if (s->embedded && i == 0 && d->next == 1) {
            e->file = l->file;    /* the descriptor's own file */
        } else {
            e->path = extent_path(lname(l), de->file);
            if (!e->path)
                return -ENOMEM;
            if (!strcmp(e->path, lname(l)) || (s->embedded && !strcmp(de->file, base))) {
                e->file = l->file;
            } else {
                bool ro = l->readonly || e->access == VMDK_RDONLY;
                r = vd_file_open(e->path, (ro ? VD_FILE_RDONLY : 0) | (l->readonly ? VD_FILE_NOLOCK : 0),
                                 l->cache, &e->file);
                if (r < 0)
                    return vd_err(r, "%s: cannot open extent %zu file %s: %s", lname(l), i, e->path,
                                  vd_errmsg(r));
                e->own_file = true;
            }
        }
        const char *en = e->path ? e->path : lname(l);
        if (e->type == VMDK_SPARSE || e->type == VMDK_VMFSSPARSE) {
            r = vd_vmdk_sparse_open(en, e->file, &e->sp);
            if (r < 0)
                return r;
            if (e->sp->capacity < e->sectors)
                return vd_err(-EINVAL, "%s: extent %zu (%s) holds %llu sectors but the descriptor "
                              "gives it %llu", lname(l), i, en, (unsigned long long)e->sp->capacity,
                              (unsigned long long)e->sectors);
            if (e->sp->grain * VMDK_SECTOR > l->alloc_unit)
                l->alloc_unit = (uint32_t)(e->sp->grain * VMDK_SECTOR);
        } else {
            uint64_t fs;
            r = vd_file_size(e->file, &fs);
            if (r < 0)
                return vd_err(r, "%s: cannot get the size of %s", lname(l), en);
            if (fs < e->flat_off + e->sectors * VMDK_SECTOR)
                return vd_err(-EINVAL, "%s: flat extent %zu file %s has %llu bytes, the extent "
                              "needs %llu", lname(l), i, en, (unsigned long long)fs,
                              (unsigned long long)(e->flat_off + e->sectors * VMDK_SECTOR));
        }
    }
    l->size = start * VMDK_SECTOR;
    return 0;
}

static int vmdk_open_inner(struct vd_layer *l)
{
    struct vmdk *s = calloc(1, sizeof(*s));
    char *text = NULL;
    size_t len = 0;
    int r;
    if (!s)
        return -ENOMEM;
    l->priv = s;
    r = vd_vmdk_read_desc(lname(l), l->file, &text, &len, &s->embedded);
    if (r < 0)
        return r;
    if (!text) {
        /* A sparse extent without a descriptor: describe it as one extent. */
        uint8_t h[VMDK_SECTOR];
        r = vd_file_pread(l->file, h, sizeof(h), 0);
        if (r < 0)
            return r;
        const char *b = strrchr(lname(l), '/');
        if (asprintf(&text, "version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n"
                     "RW %llu SPARSE \"%s\"\n", (unsigned long long)le64(h + VH_CAPACITY),
                     b ? b + 1 : lname(l)) < 0)
            return -ENOMEM;
        len = strlen(text);
        s->embedded = false;
    }
    r = vd_vmdk_desc_parse(lname(l), text, len, &s->desc);
    free(text);
    if (r < 0)
        return r;
    const char *ct = s->desc.create_type;
    static const char *const refused[] = { "vmfsRDM", "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap",
                                           "fullDevice", "partitionedDevice", "seSparse", NULL };
    for (int i = 0; refused[i]; i++)
        if (!strcmp(ct, refused[i]))
            return vd_err(-ENOTSUP, "%s: createType \"%s\" is not supported", lname(l), ct);
    s->stream_type = !strcmp(ct, "streamOptimized");
    r = open_extents(l, s);
    if (r < 0)
        return r;
    l->cluster_size = 0;
    for (size_t i = 0; i < s->next; i++)
        if (s->ext[i].sp && s->ext[i].sp->compressed)
            l->compressed_only = true;
    for (size_t i = 0; i < s->next; i++)
        if (s->ext[i].sp) {
            l->cluster_size = (uint32_t)(s->ext[i].sp->grain * VMDK_SECTOR);
            break;
        }
    if (s->desc.parent_cid != 0xFFFFFFFFu) {
        if (!s->desc.parent_hint || !s->desc.parent_hint[0])
            return vd_err(-EINVAL, "%s: delta disk (parentCID=%08x) without parentFileNameHint",
                          lname(l), s->desc.parent_cid);
        l->backing_name = strdup(s->desc.parent_hint);
        l->backing_fmt = strdup("vmdk");
        if (!l->backing_name || !l->backing_fmt)
            return -ENOMEM;
    }
    return 0;
}

static void vmdk_close(struct vd_layer *l)
{
    struct vmdk *s = l->priv;
    if (!s)
        return;
    for (size_t i = 0; i < s->next; i++) {
        struct vmdk_extent *e = &s->ext[i];
        if (e->sp && e->sp->stream && !l->readonly)
            vd_vmdk_stream_finish(e->path ? e->path : lname(l), e->file, e->sp);
        if (e->sp && !l->readonly)      /* normally done by the flush before close */
            vd_vmdk_sparse_write_links(e->path ? e->path : lname(l), e->file, e->sp);
        vd_vmdk_sparse_free(e->sp);
        if (e->own_file)
            vd_file_close(e->file);
        free(e->path);
    }
    free(s->ext);
    free(s->pend);
    vd_vmdk_desc_free(&s->desc);
    if (s->scratch) {
        vd_file_close(s->scratch->f);
        free(s->scratch->used);
        free(s->scratch);
    }
    free(s);
    l->priv = NULL;
}

/* A failed open cleans up after itself (the core does not call close). */
static int vmdk_open(struct vd_layer *l)
{
    int r = vmdk_open_inner(l);
    if (r < 0)
        vmdk_close(l);
    return r;
}

struct vmdk_extent *vd_vmdk_find_extent(struct vmdk *s, uint64_t sector)
{
    size_t lo = 0, hi = s->next;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        struct vmdk_extent *e = &s->ext[mid];
        if (sector < e->start)
            hi = mid;
        else if (sector >= e->start + e->sectors)
            lo = mid + 1;
        else
            return e;
    }
    return NULL;
}

/* Write the descriptor back (a new CID). */
static int write_desc(struct vd_layer *l, struct vmdk *s)
{
    size_t len;
    char *t = vd_vmdk_desc_text(&s->desc, &len);
    int r;
    if (!t)
        return -ENOMEM;
    if (s->embedded) {
        struct vmdk_sparse *sp = s->ext[0].sp;
        uint64_t cap = sp && sp->desc_size <= MAX_DESC_BYTES / VMDK_SECTOR ? sp->desc_size * VMDK_SECTOR : 0;
        if (!sp || len + 1 > cap) {
            free(t);
            return vd_err(-ENOSPC, "%s: the descriptor no longer fits its %llu bytes", lname(l),
                          (unsigned long long)cap);
        }
        char *pad = calloc(1, cap);
        if (!pad) {
            free(t);
            return -ENOMEM;
        }
        memcpy(pad, t, len);
        r = vd_file_pwrite(l->file, pad, cap, sp->desc_off * VMDK_SECTOR);
        free(pad);
    } else {
        r = vd_file_pwrite(l->file, t, len, 0);
        if (r >= 0)
            r = vd_file_truncate(l->file, len);
    }
    free(t);
    return r < 0 ? vd_err(r, "%s: cannot rewrite the descriptor", lname(l)) : 0;
}

int vd_vmdk_write_desc(struct vd_layer *l)
{
    return write_desc(l, l->priv);
}

bool vd_vmdk_pending(const struct vmdk *s, size_t ext, uint64_t g)
{
    for (size_t i = 0; i < s->npend; i++)
        if (s->pend[i].ext == ext && s->pend[i].g == g)
            return true;
    return false;
}

static int pend_add(struct vmdk *s, size_t ext, uint64_t g)
{
    if (s->npend == s->cpend) {
        size_t c = s->cpend ? s->cpend * 2 : 16;
        struct vmdk_pend *p = realloc(s->pend, c * sizeof(*p));
        if (!p)
            return -ENOMEM;
        s->pend = p;
        s->cpend = c;
    }
    s->pend[s->npend++] = (struct vmdk_pend){ ext, g };
    return 0;
}

static void pend_del(struct vmdk *s, size_t ext, uint64_t g)
{
    for (size_t i = 0; i < s->npend; i++)
        if (s->pend[i].ext == ext && s->pend[i].g == g) {
            s->pend[i] = s->pend[--s->npend];
            return;
        }
}

/* First write of this open: a new content ID, so children of this disk
 * see it changed under them. */
static int touch_cid(struct vd_layer *l, struct vmdk *s)
{
    if (s->cid_updated || l->readonly)
        return 0;
    s->cid_updated = true;
    if (s->ext[0].sp && !s->embedded && s->desc.cid == 0xFFFFFFFEu)
        return 0;     /* a bare extent: no descriptor to update */
    uint32_t c;
    do
        c = vd_vmdk_new_cid();
    while (c == s->desc.cid);
    char v[16];
    snprintf(v, sizeof(v), "%08x", c);
    int r = vd_vmdk_desc_set(&s->desc, "CID", v, false);
    if (r < 0)
        return r;
    s->desc.cid = c;
    return write_desc(l, s);
}

int vd_vmdk_touch_cid(struct vd_layer *l)
{
    return touch_cid(l, l->priv);
}

static int vmdk_map(struct vd_layer *l, uint64_t off, uint64_t len, unsigned flags, struct vd_map *m)
{
    struct vmdk *s = l->priv;
    memset(m, 0, sizeof(*m));
    if (flags & VD_MAP_F_WRITE) {
        int r = touch_cid(l, s);
        if (r < 0)
            return r;
    }
    uint64_t sec = off / VMDK_SECTOR;
    struct vmdk_extent *e = vd_vmdk_find_extent(s, sec);
    if (!e)
        return vd_err(-EIO, "%s: offset %llu is beyond the extents", lname(l), (unsigned long long)off);
    uint64_t estart = e->start * VMDK_SECTOR, eend = (e->start + e->sectors) * VMDK_SECTOR;
    if (len > eend - off)
        len = eend - off;
    uint64_t rel = off - estart;
    const char *en = e->path ? e->path : lname(l);
    switch (e->type) {
    case VMDK_ZERO:
        m->kind = VD_MAP_ZERO;
        m->len = len;
        return 0;
    case VMDK_FLAT:
    case VMDK_VMFS:
        if (e->access == VMDK_NOACCESS)
            return vd_err(-EACCES, "%s: offset %llu lies in a NOACCESS extent", lname(l),
                          (unsigned long long)off);
        m->kind = VD_MAP_DATA;
        m->file = e->file;
        m->host_off = e->flat_off + rel;
        m->len = len;
        if (flags & VD_MAP_F_STATUS)
            vd_map_file_status(m);
        return 0;
    default:
        break;
    }
    if (e->access == VMDK_NOACCESS)
        return vd_err(-EACCES, "%s: offset %llu lies in a NOACCESS extent", lname(l),
                      (unsigned long long)off);
    struct vmdk_sparse *sp = e->sp;
    uint64_t gb = sp->grain * VMDK_SECTOR;
    uint64_t g = rel / gb, in = rel % gb;
    uint32_t gte;
    int r = vd_vmdk_sparse_gte(en, e->file, sp, g, &gte);
    if (r < 0)
        return r;
    uint64_t n = gb - in;
    if (n > len)
        n = len;
    m->file = e->file;
    if (gte == 0 || (gte == 1 && sp->zero_gte)) {
        m->kind = gte ? VD_MAP_ZERO : VD_MAP_UNALLOC;
        /* Extend over following grains of the same kind. */
        while (n < len) {
            uint32_t x;
            if (vd_vmdk_sparse_gte(en, e->file, sp, g + 1, &x) < 0 || x != gte)
                break;
            g++;
            n = n + gb > len ? len : n + gb;
        }
        m->len = n;
        return 0;
    }
    if (sp->compressed) {
        m->kind = VD_MAP_COMPRESSED;
        m->host_off = (uint64_t)gte * VMDK_SECTOR;
        m->comp_len = (uint32_t)(gb + gb / 8 + 1024);
        uint64_t ustart = estart + g * gb;
        m->comp_unit = (uint32_t)(ustart + gb > eend ? eend - ustart : gb);
        m->comp_voff = ustart;
        m->len = n;
        return 0;
    }
    m->kind = VD_MAP_DATA;
    m->host_off = (uint64_t)gte * VMDK_SECTOR + in;
    while (n < len) {
        uint32_t x;
        if (vd_vmdk_sparse_gte(en, e->file, sp, g + 1, &x) < 0 ||
            (uint64_t)x * VMDK_SECTOR != (uint64_t)gte * VMDK_SECTOR + (g + 1 - rel / gb) * gb)
            break;
        g++;
        n = n + gb > len ? len : n + gb;
    }
    m->len = n;
    return 0;
}

static int vmdk_read_compressed(struct vd_layer *l, const struct vd_map *m, void *buf)
{
    struct vmdk *s = l->priv;
    struct vmdk_extent *e = vd_vmdk_find_extent(s, m->comp_voff / VMDK_SECTOR);
    if (!e || !e->sp)
        return vd_err(-EIO, "%s: no compressed extent at offset %llu", lname(l),
                      (unsigned long long)m->comp_voff);
    uint64_t gb = e->sp->grain * VMDK_SECTOR;
    uint64_t lba = m->comp_voff / VMDK_SECTOR - e->start;
    const char *en = e->path ? e->path : lname(l);
    if (m->comp_unit == gb)
        return vd_vmdk_read_grain(en, m->file, m->host_off, m->comp_len, lba, buf, gb);
    uint8_t *tmp = malloc(gb);
    if (!tmp)
        return -ENOMEM;
    int r = vd_vmdk_read_grain(en, m->file, m->host_off, m->comp_len, lba, tmp, gb);
    if (r >= 0)
        memcpy(buf, tmp, m->comp_unit);
    free(tmp);
    return r;
}

/* Every streamOptimized append of grain g of e starts here: the grain must
 * still be unwritten (the format is append-only), and the stream must be
 * open for appending. */
static int stream_claim(struct vd_layer *l, struct vmdk_extent *e, uint64_t g)
{
    struct vmdk_sparse *sp = e->sp;
    const char *en = e->path ? e->path : lname(l);
    uint32_t gte;
    int r = vd_vmdk_sparse_gte(en, e->file, sp, g, &gte);
    if (r < 0)
        return r;
    if (gte != 0)
        return vd_err(-EPERM, "%s: streamOptimized VMDK is append-only: grain at offset %llu is "
                      "already written (convert the image to change it)", lname(l),
                      (unsigned long long)((e->start + g * sp->grain) * VMDK_SECTOR));
    return vd_vmdk_stream_begin(en, e->file, sp);
}

/* Append a compressed grain blob (marker included) for grain g of e. */
static int stream_append_blob(struct vd_layer *l, struct vmdk_extent *e, uint64_t g,
                              const uint8_t *blob, size_t blen)
{
    int r = stream_claim(l, e, g);
    if (r < 0)
        return r;
    return vd_vmdk_stream_append(e->path ? e->path : lname(l), e->file, e->sp, g, blob, blen);
}

/* streamOptimized appends: compress, then link. */
static int stream_write(struct vd_layer *l, struct vmdk_extent *e, uint64_t g, const void *buf, size_t len)
{
    struct vmdk_sparse *sp = e->sp;
    const char *en = e->path ? e->path : lname(l);
    uint64_t gb = sp->grain * VMDK_SECTOR;
    int r = stream_claim(l, e, g);
    if (r < 0)
        return r;
    if (vd_buf_is_zero(buf, len))
        return 0;    /* an all-zero grain stays unallocated */
    uint8_t *blob;
    size_t blen;
    r = vd_vmdk_compress_grain(buf, len, gb, g * sp->grain, &blob, &blen);
    if (r < 0)
        return vd_err(r, "%s: cannot compress grain %llu", lname(l), (unsigned long long)g);
    r = vd_vmdk_stream_append(en, e->file, sp, g, blob, blen);
    free(blob);
    return r;
}

/* The target of both compressed write paths: the grain g at offset off
 * (grain-aligned) of a writable streamOptimized extent e. The request is
 * checked before the CID is touched, so a refused one leaves the image
 * as it was. */
static int compressed_target(struct vd_layer *l, uint64_t off, struct vmdk_extent **ep, uint64_t *g)
{
    struct vmdk_extent *e = vd_vmdk_find_extent(l->priv, off / VMDK_SECTOR);
    if (!e || !e->sp || !e->sp->compressed)
        return vd_err(-ENOTSUP, "%s: only streamOptimized VMDK stores compressed grains", lname(l));
    if (e->access != VMDK_RW)
        return vd_err(-EPERM, "%s: offset %llu lies in a read-only extent", lname(l),
                      (unsigned long long)off);
    uint64_t gb = e->sp->grain * VMDK_SECTOR, rel = off - e->start * VMDK_SECTOR;
    if (rel % gb)
        return vd_err(-EINVAL, "%s: compressed write at %llu is not grain-aligned", lname(l),
                      (unsigned long long)off);
    *ep = e;
    *g = rel / gb;
    return touch_cid(l, l->priv);
}

static int vmdk_write_compressed(struct vd_layer *l, uint64_t off, const void *buf, size_t len)
{
    struct vmdk_extent *e;
    uint64_t g;
    int r = compressed_target(l, off, &e, &g);
    return r < 0 ? r : stream_write(l, e, g, buf, len);
}

static struct vmdk_scratch *scratch_of(struct vmdk *s);

/* convert -c: compression off the layer lock (any thread), then linking
 * under it. The blob is the bare zlib stream; the marker needs the offset. */
static int vmdk_compress(struct vd_layer *l, const void *in, size_t len, void *out, size_t *outlen)
{
    struct vmdk *s = l->priv;
    uint64_t gb = 0;
    for (size_t i = 0; i < s->next && !gb; i++)
        if (s->ext[i].sp && s->ext[i].sp->compressed)
            gb = s->ext[i].sp->grain * VMDK_SECTOR;
    if (!gb || len > gb)
        return vd_err(-ENOTSUP, "%s: only streamOptimized VMDK stores compressed grains", lname(l));
    return vd_vmdk_deflate(in, len, gb, out, *outlen, outlen);
}

static int vmdk_write_compressed_raw(struct vd_layer *l, uint64_t off, const void *z, size_t zlen)
{
    struct vmdk_extent *e;
    uint64_t g;
    int r = compressed_target(l, off, &e, &g);
    if (r < 0)
        return r;
    struct vmdk_sparse *sp = e->sp;
    const char *en = e->path ? e->path : lname(l);
    r = stream_claim(l, e, g);
    if (r < 0)
        return r;
    uint8_t *blob;
    size_t blen;
    r = vd_vmdk_frame_grain(g * sp->grain, z, zlen, &blob, &blen);
    if (r < 0)
        return r;
    r = vd_vmdk_stream_append(en, e->file, sp, g, blob, blen);
    free(blob);
    return r;
}

static int vmdk_alloc(struct vd_layer *l, uint64_t off, uint64_t len, struct vd_alloc *a)
{
    struct vmdk *s = l->priv;
    struct vmdk_extent *e = vd_vmdk_find_extent(s, off / VMDK_SECTOR);
    memset(a, 0, sizeof(*a));
    if (!e)
        return vd_err(-EIO, "%s: offset %llu is beyond the extents", lname(l), (unsigned long long)off);
    if (e->access != VMDK_RW)
        return vd_err(-EPERM, "%s: offset %llu lies in a %s extent", lname(l),
                      (unsigned long long)off, e->access == VMDK_RDONLY ? "RDONLY" : "NOACCESS");
    if (e->type == VMDK_ZERO)
        return vd_err(-EPERM, "%s: offset %llu lies in a ZERO extent, which cannot hold data",
                      lname(l), (unsigned long long)off);
    if (!e->sp)
        return vd_err(-EIO, "%s: a flat extent needs no allocation (offset %llu)", lname(l),
                      (unsigned long long)off);
    struct vmdk_sparse *sp = e->sp;
    const char *en = e->path ? e->path : lname(l);
    if (sp->cowd)
        return vd_err(-ENOTSUP, "%s: writing ESX COWD (VMFSSPARSE) extents is not supported", lname(l));
    int r = touch_cid(l, s);
    if (r < 0)
        return r;
    uint64_t gb = sp->grain * VMDK_SECTOR;
    uint64_t estart = e->start * VMDK_SECTOR, eend = (e->start + e->sectors) * VMDK_SECTOR;
    uint64_t rel = off - estart, g = rel / gb;
    uint64_t gstart = estart + g * gb, gend = gstart + gb > eend ? eend : gstart + gb;
    a->off = off;
    a->len = len > gend - off ? gend - off : len;
    a->fill_off = gstart;
    a->fill_len = gend - gstart;
    a->priv[0] = (uint64_t)(e - s->ext);
    a->priv[1] = g;
    if (sp->compressed) {
        uint32_t gte;
        r = vd_vmdk_sparse_gte(en, e->file, sp, g, &gte);
        if (r < 0)
            return r;
        if (gte != 0)
            return vd_err(-EPERM, "%s: streamOptimized VMDK is append-only: grain at offset %llu "
                          "is already written (convert the image to change it)", lname(l),
                          (unsigned long long)gstart);
        struct vmdk_scratch *sc = scratch_of(s);
        if (!sc)
            return vd_err(-EIO, "%s: cannot create scratch space for a streamOptimized write: %s",
                          lname(l), vd_errmsg(-EIO));
        size_t slot = 0;
        while (slot < sc->n && sc->used[slot])
            slot++;
        if (slot == sc->n) {
            uint8_t *nu = realloc(sc->used, sc->n + 16);
            if (!nu)
                return -ENOMEM;
            memset(nu + sc->n, 0, 16);
            sc->used = nu;
            sc->n += 16;
        }
        sc->used[slot] = 1;
        a->file = sc->f;
        a->host_off = slot * gb;
        a->fresh = false;
        a->priv[2] = 2;
        a->priv[3] = slot;
        r = pend_add(s, (size_t)a->priv[0], g);
        if (r < 0)
            sc->used[slot] = 0;
        return r;
    }
    uint64_t at = sp->next;
    if (at / VMDK_SECTOR + sp->grain > 0xFFFFFFFFull)
        return vd_err(-EFBIG, "%s: extent %s is full (2 TiB of sectors)", lname(l), en);
    r = pend_add(s, (size_t)a->priv[0], g);
    if (r < 0)
        return r;
    /* Grow the file over the whole grain now: the core may write only the
     * non-zero part, and the file's end is where the next grain goes. */
    r = vd_file_truncate(e->file, at + gb);
    if (r < 0) {
        pend_del(s, (size_t)a->priv[0], g);
        return vd_err(r, "%s: cannot extend %s to %llu bytes", lname(l), en,
                      (unsigned long long)(at + gb));
    }
    sp->next += gb;
    if (sp->next > sp->fsize)
        sp->fsize = sp->next;
    a->file = e->file;
    a->host_off = at;
    a->fresh = true;
    a->priv[2] = 1;
    a->priv[3] = at / VMDK_SECTOR;
    return 0;
}

static int vmdk_commit(struct vd_layer *l, struct vd_alloc *a, int err)
{
    struct vmdk *s = l->priv;
    struct vmdk_extent *e = &s->ext[a->priv[0]];
    struct vmdk_sparse *sp = e->sp;
    const char *en = e->path ? e->path : lname(l);
    uint64_t gb = sp->grain * VMDK_SECTOR;
    pend_del(s, (size_t)a->priv[0], a->priv[1]);
    if (a->priv[2] == 2) {
        struct vmdk_scratch *sc = scratch_of(s);
        int r = err;
        uint8_t *buf = NULL, *blob = NULL;
        size_t blen = 0;
        if (r >= 0) {
            buf = malloc(gb);
            r = buf ? vd_file_pread(sc->f, buf, a->fill_len, a->host_off) : -ENOMEM;
        }
        sc->used[a->priv[3]] = 0;
        if (r >= 0 && !vd_buf_is_zero(buf, a->fill_len)) {
            /* Compress with the layer lock dropped, so that the grains of
             * concurrent writes compress in parallel: the buffer is ours,
             * and the core keeps other writes out of this grain until
             * commit returns. Only linking the blob needs the lock. */
            pthread_mutex_unlock(&l->lock);
            r = vd_vmdk_compress_grain(buf, a->fill_len, gb, a->priv[1] * sp->grain, &blob, &blen);
            pthread_mutex_lock(&l->lock);
            if (r < 0)
                r = vd_err(r, "%s: cannot compress grain %llu", lname(l),
                           (unsigned long long)a->priv[1]);
            else
                r = stream_append_blob(l, e, a->priv[1], blob, blen);
        }
        free(buf);
        free(blob);
        return r < 0 && err >= 0 ? r : 0;
    }
    if (err < 0) {
        if (sp->next == a->priv[3] * VMDK_SECTOR + gb)
            sp->next -= gb;     /* the last reservation: give it back */
        return 0;
    }
    return vd_vmdk_sparse_link(en, e->file, sp, a->priv[1], (uint32_t)a->priv[3]);
}

static struct vmdk_scratch *scratch_of(struct vmdk *s)
{
    if (s->scratch)
        return s->scratch;
    struct vmdk_scratch *sc = calloc(1, sizeof(*sc));
    if (!sc)
        return NULL;
    const char *dir = getenv("TMPDIR");
    char *path;
    if (asprintf(&path, "%s/vdisk-vmdk-XXXXXX", dir && *dir ? dir : "/tmp") < 0) {
        free(sc);
        return NULL;
    }
    int fd = mkstemp(path);
    if (fd < 0 || vd_file_open(path, VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &sc->f) < 0) {
        if (fd >= 0) {
            close(fd);
            unlink(path);
        }
        free(path);
        free(sc);
        return NULL;
    }
    close(fd);
    unlink(path);     /* gone with the last descriptor */
    free(path);
    s->scratch = sc;
    return sc;
}

/* Finish streams, and sync extent files other than l->file (the core syncs
 * that one): a flush covers every file the disk's data lives in. */
static int vmdk_flush(struct vd_layer *l)
{
    struct vmdk *s = l->priv;
    if (l->readonly)
        return 0;
    for (size_t i = 0; i < s->next; i++) {
        struct vmdk_extent *e = &s->ext[i];
        if (e->sp && e->sp->stream) {
            int r = vd_vmdk_stream_finish(e->path ? e->path : lname(l), e->file, e->sp);
            if (r < 0)
                return r;
        }
        if (e->sp) {
            int r = vd_vmdk_sparse_write_links(e->path ? e->path : lname(l), e->file, e->sp);
            if (r < 0)
                return r;
        }
        if (e->own_file && e->access == VMDK_RW && e->file != l->file) {
            int r = vd_file_sync(e->file);
            if (r < 0)
                return vd_err(r, "%s: cannot sync extent file %s", lname(l), e->path);
        }
    }
    return 0;
}

static int vmdk_backing_opened(struct vd_layer *l)
{
    struct vmdk *s = l->priv;
    struct vd_layer *p = l->backing;
    if (!p || s->desc.parent_cid == 0xFFFFFFFFu)
        return 0;
    if (!p->fmt || strcmp(p->fmt->name, "vmdk") != 0 || !p->priv)
        return vd_err(-EINVAL, "%s: the parent of a VMDK delta disk must be a VMDK, %s is %s",
                      lname(l), p->filename ? p->filename : "?", p->fmt ? p->fmt->name : "?");
    struct vmdk *ps = p->priv;
    if (ps->desc.cid != s->desc.parent_cid)
        return vd_err(-EINVAL, "%s: parentCID %08x does not match the CID %08x of parent %s: the "
                      "parent changed after this delta disk was made", lname(l), s->desc.parent_cid,
                      ps->desc.cid, p->filename ? p->filename : "?");
    if (p->size != l->size)
        return vd_err(-EINVAL, "%s: size %llu differs from parent %s's %llu", lname(l),
                      (unsigned long long)l->size, p->filename ? p->filename : "?",
                      (unsigned long long)p->size);
    return 0;
}

static const char *provisioning(struct vd_layer *l, struct vmdk *s)
{
    const char *thin = vd_vmdk_desc_get(&s->desc, "ddb.thinProvisioned");
    bool any_flat = false;
    for (size_t i = 0; i < s->next; i++) {
        if (s->ext[i].sp)
            return "thin";
        if (s->ext[i].file)
            any_flat = true;
    }
    if (thin && !strcmp(thin, "1"))
        return "thin";
    if (!any_flat)
        return "thin";
    /* Flat: as the file system holds the first extent's file. */
    for (size_t i = 0; i < s->next; i++)
        if (s->ext[i].file)
            return vd_provisioning_of(s->ext[i].file, s->ext[i].flat_off, s->ext[i].sectors * VMDK_SECTOR,
                                      s->ext[i].sectors * VMDK_SECTOR);
    return "thick";
}

static int vmdk_info(struct vd_layer *l, json_t *info)
{
    struct vmdk *s = l->priv;
    json_t *ext = json_array();
    for (size_t i = 0; i < s->next; i++) {
        struct vmdk_extent *e = &s->ext[i];
        json_t *o = json_object();
        json_object_set_new(o, "filename", json_string(e->path ? e->path : lname(l)));
        json_object_set_new(o, "format", json_string(vd_vmdk_etype_name(e->type)));
        json_object_set_new(o, "virtual-size", json_integer((json_int_t)(e->sectors * VMDK_SECTOR)));
        if (e->sp) {
            json_object_set_new(o, "cluster-size", json_integer((json_int_t)(e->sp->grain * VMDK_SECTOR)));
            if (e->sp->compressed)
                json_object_set_new(o, "compressed", json_true());
        }
        json_array_append_new(ext, o);
    }
    json_t *data = json_pack("{s:I, s:I, s:s, s:o}", "cid", (json_int_t)s->desc.cid,
                             "parent-cid", (json_int_t)s->desc.parent_cid,
                             "create-type", s->desc.create_type, "extents", ext);
    json_object_set_new(info, "format-specific", json_pack("{s:s, s:o}", "type", "vmdk", "data", data));
    json_object_set_new(info, "provisioning", json_string(provisioning(l, s)));
    /* Disk size counts every extent file, as qemu-img's does. */
    uint64_t alloc = vd_file_allocated_bytes(l->file);
    for (size_t i = 0; i < s->next; i++)
        if (s->ext[i].file && s->ext[i].file != l->file)
            alloc += vd_file_allocated_bytes(s->ext[i].file);
    json_object_set_new(info, "actual-size", json_integer((json_int_t)alloc));
    return 0;
}

static int vmdk_check(struct vd_layer *l, unsigned fix, struct vd_check *c)
{
    struct vmdk *s = l->priv;
    int64_t total = 0, alloc = 0, comp = 0;
    for (size_t i = 0; i < s->next; i++) {
        struct vmdk_extent *e = &s->ext[i];
        if (!e->sp)
            continue;
        const char *en = e->path ? e->path : lname(l);
        uint64_t grains = (e->sectors + e->sp->grain - 1) / e->sp->grain;
        for (uint64_t g = 0; g < grains; g++) {
            uint32_t gte;
            total++;
            if (vd_vmdk_sparse_gte(en, e->file, e->sp, g, &gte) < 0) {
                vd_check_report(c, "ERROR %s", vd_errmsg(-EINVAL));
                c->corruptions++;
                continue;
            }
            if (gte > 1 || (gte == 1 && !e->sp->zero_gte)) {
                alloc++;
                if (e->sp->compressed)
                    comp++;
            }
            if (e->sp->rgd && e->sp->rgd[g / e->sp->gtes] == 0 && e->sp->gd[g / e->sp->gtes]) {
                vd_check_report(c, "ERROR %s: redundant grain directory entry %llu is missing", en,
                                (unsigned long long)(g / e->sp->gtes));
                c->corruptions++;
                g += e->sp->gtes - 1;
            }
        }
    }
    c->total_clusters = total;
    c->allocated_clusters = alloc;
    c->compressed_clusters = comp;
    return 0;
}

/* rebase: a new parent (its CID becomes parentCID) or none. */
static int vmdk_set_backing(struct vd_layer *l, const char *name, const char *fmt)
{
    struct vmdk *s = l->priv;
    char cid[16];
    uint32_t pcid = 0xFFFFFFFFu;
    int r;
    if (name) {
        if (fmt && strcmp(fmt, "vmdk"))
            return vd_err(-ENOTSUP, "%s: a VMDK delta disk needs a VMDK parent, not %s", lname(l), fmt);
        char *path = extent_path(lname(l), name), *text = NULL;
        size_t len = 0;
        bool emb;
        struct vd_file *f;
        if (!path)
            return -ENOMEM;
        r = vd_file_open(path, VD_FILE_RDONLY | VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &f);
        if (r < 0) {
            r = vd_err(r, "%s: cannot open the new parent %s", lname(l), path);
            free(path);
            return r;
        }
        r = vd_vmdk_read_desc(path, f, &text, &len, &emb);
        vd_file_close(f);
        struct vmdk_desc pd;
        if (r >= 0 && text)
            r = vd_vmdk_desc_parse(path, text, len, &pd);
        else if (r >= 0)
            r = vd_err(-EINVAL, "%s: the new parent %s has no descriptor", lname(l), path);
        free(text);
        free(path);
        if (r < 0)
            return r;
        pcid = pd.cid;
        vd_vmdk_desc_free(&pd);
        r = vd_vmdk_desc_set(&s->desc, "parentFileNameHint", name, true);
        if (r < 0)
            return r;
    }
    snprintf(cid, sizeof(cid), "%08x", pcid);
    r = vd_vmdk_desc_set(&s->desc, "parentCID", cid, false);
    if (r < 0)
        return r;
    s->desc.parent_cid = pcid;
    r = write_desc(l, s);
    if (r < 0)
        return r;
    free(l->backing_name);
    free(l->backing_fmt);
    l->backing_name = name ? strdup(name) : NULL;
    l->backing_fmt = name ? strdup("vmdk") : NULL;
    return 0;
}

static const struct vd_create_opt_desc vmdk_create_opts[] = {
    { "subformat", "monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse, "
                   "twoGbMaxExtentFlat, streamOptimized, vmfs, vmfsThin" },
    { "adapter_type", "ide (default), buslogic, lsilogic, legacyESX, pvscsi" },
    { "zeroed_grain", "on: version-2 sparse extents with zeroed-grain entries" },
    { "hwversion", "virtual hardware version (default 4)" },
    { "compat6", "on: hwversion 6" },
    { "toolsversion", "VMware Tools version for the DDB" },
    { "preallocation", "off/metadata (sparse), falloc or full (flat extents)" },
    { "provisioning", "thin (sparse, or vmfsThin), lazy-zeroed or eager-zeroed (flat extents)" },
    { NULL, NULL },
};

const struct vd_format vd_format_vmdk = {
    .name = "vmdk",
    .probe = vmdk_probe,
    .open = vmdk_open,
    .close = vmdk_close,
    .create = vd_vmdk_create,
    .map = vmdk_map,
    .alloc = vmdk_alloc,
    .commit = vmdk_commit,
    .read_compressed = vmdk_read_compressed,
    .write_compressed = vmdk_write_compressed,
    .compress = vmdk_compress,
    .write_compressed_raw = vmdk_write_compressed_raw,
    .discard = vd_vmdk_discard,
    .zero = vd_vmdk_zero,
    .flush = vmdk_flush,
    .resize = vd_vmdk_resize,
    .check = vmdk_check,
    .info = vmdk_info,
    .backing_opened = vmdk_backing_opened,
    .set_backing = vmdk_set_backing,
    .create_opts = vmdk_create_opts,
};
