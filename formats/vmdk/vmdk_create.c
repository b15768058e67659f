/* VMDK creation: every subformat, provisioning and delta disks.
 *
 * provisioning (preallocation)    subformat when none is given
 *   thin (off, metadata)           monolithicSparse (grain tables preallocated)
 *   lazy-zeroed (falloc)           monolithicFlat, flat file fallocated
 *   eager-zeroed (full)            monolithicFlat, flat file written with zeros
 * Flat subformats with thin provisioning get a sparse host file and
 * ddb.thinProvisioned = "1". */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include "vdisk/error.h"
#include "vdisk/format.h"
#include "formats/vmdk/vmdk.h"

enum sub { MONO_SPARSE, MONO_FLAT, TWO_SPARSE, TWO_FLAT, STREAM, VMFS, VMFS_THIN };
static const char *const sub_names[] = { "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                                         "twoGbMaxExtentFlat", "streamOptimized", "vmfs", "vmfsThin" };

static bool sub_sparse(enum sub s) { return s == MONO_SPARSE || s == TWO_SPARSE || s == STREAM; }

struct buf {
    char *p;
    size_t n, cap;
    bool oom;
};

static void bprintf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) {
            b->oom = true;
            return;
        }
        if (b->p && b->n + (size_t)k < b->cap) {
            b->n += (size_t)k;
            return;
        }
        size_t nc = (b->cap + (size_t)k + 1) * 2;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
}

static int write_zeros(struct vd_file *f, uint64_t len, const char *name)
{
    int r = vd_file_write_zeros(f, 0, len);
    return r < 0 ? vd_err(r, "%s: cannot write zeros: %s", name, vd_errmsg(r)) : 0;
}

static int create_file(const char *path, struct vd_file **f)
{
    int r = vd_file_open(path, VD_FILE_CREATE | VD_FILE_TRUNC, VD_CACHE_WRITEBACK, f);
    return r < 0 ? vd_err(r, "%s: cannot create: %s", path, vd_errmsg(r)) : 0;
}

static int make_flat(const char *path, uint64_t bytes, enum vd_prealloc p)
{
    struct vd_file *f;
    int r = create_file(path, &f);
    if (r < 0)
        return r;
    r = vd_file_truncate(f, bytes);
    if (r >= 0 && p == VD_PREALLOC_FALLOC)
        r = vd_file_allocate(f, 0, bytes);
    if (r >= 0 && p == VD_PREALLOC_FULL)
        r = write_zeros(f, bytes, path);
    if (r >= 0)
        r = vd_file_sync(f);
    vd_file_close(f);
    return r < 0 ? vd_err(r, "%s: cannot size the flat extent: %s", path, vd_errmsg(r)) : 0;
}

/* Parent of a delta disk: its CID and size, from its descriptor. */
static int read_parent_at(const char *child, const char *path, uint32_t *cid, uint64_t *size)
{
    struct vd_file *f;
    int r = vd_file_open(path, VD_FILE_RDONLY | VD_FILE_NOLOCK, VD_CACHE_WRITEBACK, &f);
    if (r < 0)
        return vd_err(r, "%s: cannot open the parent %s: %s", child, path, vd_errmsg(r));
    char *text = NULL;
    size_t len = 0;
    bool emb;
    r = vd_vmdk_read_desc(path, f, &text, &len, &emb);
    if (r >= 0 && !text) {
        uint8_t h[VMDK_SECTOR];
        r = vd_file_pread(f, h, sizeof(h), 0);
        *cid = 0xFFFFFFFEu;
        *size = le64(h + VH_CAPACITY) * VMDK_SECTOR;
        vd_file_close(f);
        return r;
    }
    vd_file_close(f);
    if (r < 0)
        return vd_err(r, "%s: the parent %s is not a VMDK: %s", child, path, vd_errmsg(r));
    struct vmdk_desc d;
    r = vd_vmdk_desc_parse(path, text, len, &d);
    free(text);
    if (r < 0)
        return r;
    *cid = d.cid;
    *size = 0;
    for (size_t i = 0; i < d.next; i++)
        *size += d.ext[i].sectors * VMDK_SECTOR;
    vd_vmdk_desc_free(&d);
    return 0;
}

/* The parent named `backing`, resolved against the child's folder as the
 * core resolves it when opening the chain. */
static int read_parent(const char *child, const char *backing, uint32_t *cid, uint64_t *size)
{
    char *path = vd_backing_path(child, backing);
    if (!path)
        return -ENOMEM;
    int r = read_parent_at(child, path, cid, size);
    free(path);
    return r;
}

int vd_vmdk_create(const char *filename, const struct vd_create_opts *o)
{
    const char *subs = vd_opts_get(o->opts, "subformat");
    const char *adapter = vd_opts_get(o->opts, "adapter_type");
    const char *hw = vd_opts_get(o->opts, "hwversion");
    const char *tools = vd_opts_get(o->opts, "toolsversion");
    bool zeroed = false, compat6 = false;
    int r = vd_opts_get_bool(o->opts, "zeroed_grain", &zeroed);
    if (r >= 0)
        r = vd_opts_get_bool(o->opts, "compat6", &compat6);
    if (r < 0)
        return r;
    bool thick = o->prealloc == VD_PREALLOC_FALLOC || o->prealloc == VD_PREALLOC_FULL;
    enum sub sub = thick ? MONO_FLAT : MONO_SPARSE;
    if (subs) {
        int k = -1;
        for (int i = 0; i < 7; i++)
            if (!strcmp(subs, sub_names[i]))
                k = i;
        if (k < 0)
            return vd_err(-EINVAL, "%s: unknown VMDK subformat '%s'", filename, subs);
        sub = (enum sub)k;
    }
    if (thick && (sub_sparse(sub) || sub == VMFS_THIN))
        return vd_err(-EINVAL, "%s: subformat %s is thin; lazy-/eager-zeroed provisioning needs a "
                      "flat subformat (monolithicFlat, twoGbMaxExtentFlat, vmfs)", filename, sub_names[sub]);
    if (zeroed && !sub_sparse(sub))
        return vd_err(-EINVAL, "%s: zeroed_grain needs a sparse subformat", filename);
    if (!adapter)
        adapter = "ide";
    if (strcmp(adapter, "ide") && strcmp(adapter, "buslogic") && strcmp(adapter, "lsilogic") &&
        strcmp(adapter, "legacyESX") && strcmp(adapter, "pvscsi"))
        return vd_err(-EINVAL, "%s: unknown adapter_type '%s' (ide, buslogic, lsilogic, legacyESX, pvscsi)",
                      filename, adapter);
    if (!hw)
        hw = compat6 ? "6" : "4";
    else if (compat6)
        return vd_err(-EINVAL, "%s: compat6 and hwversion cannot both be given", filename);

    uint64_t size = o->size;
    uint32_t parent_cid = 0xFFFFFFFFu;
    if (o->backing) {
        if (o->backing_fmt && strcmp(o->backing_fmt, "vmdk"))
            return vd_err(-EINVAL, "%s: a VMDK delta disk needs a VMDK parent, not %s", filename,
                          o->backing_fmt);
        if (sub != MONO_SPARSE && sub != TWO_SPARSE)
            return vd_err(-EINVAL, "%s: a delta disk must be monolithicSparse or twoGbMaxExtentSparse",
                          filename);
        uint64_t psize = 0;
        r = read_parent(filename, o->backing, &parent_cid, &psize);
        if (r < 0)
            return r;
        if (size == 0)
            size = psize;
        if (size != psize)
            return vd_err(-EINVAL, "%s: a delta disk has its parent's size (%llu), not %llu", filename,
                          (unsigned long long)psize, (unsigned long long)size);
    }
    if (size == 0)
        return vd_err(-EINVAL, "%s: the size must be given", filename);
    uint64_t sectors = (size + VMDK_SECTOR - 1) / VMDK_SECTOR;
    if (sectors > (1ull << 32) * VMDK_DEFAULT_GRAIN / 2 && sub_sparse(sub) && sub != TWO_SPARSE)
        return vd_err(-EFBIG, "%s: too large for a monolithic sparse VMDK", filename);

    /* Names: NAME.vmdk holds the descriptor; extents NAME-flat.vmdk, NAME-s001.vmdk… */
    const char *slash = strrchr(filename, '/');
    const char *base = slash ? slash + 1 : filename;
    size_t bl = strlen(base);
    if (bl > 5 && !strcmp(base + bl - 5, ".vmdk"))
        bl -= 5;
    size_t dl = (size_t)(base - filename);

    unsigned heads = strcmp(adapter, "ide") ? 255 : 16, spt = 63;
    uint64_t cyl = sectors / (heads * spt);
    if (cyl > 65535)
        cyl = 65535;
    uint8_t uuid[16], lcid[16];
    getrandom(uuid, sizeof(uuid), 0);
    getrandom(lcid, sizeof(lcid), 0);
    uint32_t cid = vd_vmdk_new_cid();

    struct buf d = { 0 };
    bprintf(&d, "# Disk DescriptorFile\nversion=1\nCID=%08x\nparentCID=%08x\ncreateType=\"%s\"\n",
            cid, parent_cid, sub_names[sub]);
    if (o->backing)
        bprintf(&d, "parentFileNameHint=\"%s\"\n", o->backing);
    bprintf(&d, "\n# Extent description\n");
    uint64_t per = (sub == TWO_SPARSE || sub == TWO_FLAT) ? VMDK_TWO_GB / VMDK_SECTOR : sectors;
    size_t next = (size_t)((sectors + per - 1) / per);
    for (size_t i = 0; i < next; i++) {
        uint64_t n = i + 1 < next ? per : sectors - per * i;
        switch (sub) {
        case MONO_SPARSE:
        case STREAM:
            bprintf(&d, "RW %llu SPARSE \"%.*s.vmdk\"\n", (unsigned long long)n, (int)bl, base);
            break;
        case TWO_SPARSE:
            bprintf(&d, "RW %llu SPARSE \"%.*s-s%03zu.vmdk\"\n", (unsigned long long)n, (int)bl, base, i + 1);
            break;
        case TWO_FLAT:
            bprintf(&d, "RW %llu FLAT \"%.*s-f%03zu.vmdk\" 0\n", (unsigned long long)n, (int)bl, base, i + 1);
            break;
        case MONO_FLAT:
            bprintf(&d, "RW %llu FLAT \"%.*s-flat.vmdk\" 0\n", (unsigned long long)n, (int)bl, base);
            break;
        case VMFS:
        case VMFS_THIN:
            bprintf(&d, "RW %llu VMFS \"%.*s-flat.vmdk\"\n", (unsigned long long)n, (int)bl, base);
            break;
        }
    }
    bprintf(&d, "\n# The Disk Data Base\n#DDB\n\n");
    bprintf(&d, "ddb.virtualHWVersion = \"%s\"\n", hw);
    bprintf(&d, "ddb.geometry.cylinders = \"%llu\"\nddb.geometry.heads = \"%u\"\nddb.geometry.sectors = \"%u\"\n",
            (unsigned long long)cyl, heads, spt);
    bprintf(&d, "ddb.adapterType = \"%s\"\n", adapter);
    bprintf(&d, "ddb.uuid = \"");
    for (int i = 0; i < 16; i++)
        bprintf(&d, "%02x%s", uuid[i], i < 15 ? " " : "\"\n");
    bprintf(&d, "ddb.longContentID = \"");
    for (int i = 0; i < 12; i++)
        bprintf(&d, "%02x", lcid[i]);
    bprintf(&d, "%08x\"\n", cid);
    if (!thick)
        bprintf(&d, "ddb.thinProvisioned = \"1\"\n");
    if (tools)
        bprintf(&d, "ddb.toolsVersion = \"%s\"\n", tools);
    if (d.oom) {
        free(d.p);
        return -ENOMEM;
    }

    char *path = NULL;
    struct vd_file *f = NULL;
    if (sub == MONO_SPARSE || sub == STREAM) {
        r = create_file(filename, &f);
        if (r < 0)
            goto out;
        if (sub == STREAM)
            r = vd_vmdk_stream_new(f, sectors, d.p, d.n, filename);
        else
            r = vd_vmdk_sparse_write_new(f, sectors, zeroed ? 2 : 1,
                                      VMDK_FLAG_NL_TEST | VMDK_FLAG_RGD | (zeroed ? VMDK_FLAG_ZERO_GTE : 0),
                                      d.p, d.n, filename);
        if (r >= 0)
            r = vd_file_sync(f);
        vd_file_close(f);
        goto out;
    }
    /* A separate descriptor, then the extents. */
    r = create_file(filename, &f);
    if (r < 0)
        goto out;
    r = vd_file_pwrite(f, d.p, d.n, 0);
    if (r >= 0)
        r = vd_file_sync(f);
    vd_file_close(f);
    if (r < 0) {
        r = vd_err(r, "%s: cannot write the descriptor: %s", filename, vd_errmsg(r));
        goto out;
    }
    for (size_t i = 0; i < next && r >= 0; i++) {
        uint64_t n = i + 1 < next ? per : sectors - per * i;
        free(path);
        path = NULL;
        int k = -1;
        if (sub == TWO_SPARSE)
            k = asprintf(&path, "%.*s%.*s-s%03zu.vmdk", (int)dl, filename, (int)bl, base, i + 1);
        else if (sub == TWO_FLAT)
            k = asprintf(&path, "%.*s%.*s-f%03zu.vmdk", (int)dl, filename, (int)bl, base, i + 1);
        else
            k = asprintf(&path, "%.*s%.*s-flat.vmdk", (int)dl, filename, (int)bl, base);
        if (k < 0) {
            path = NULL;
            r = -ENOMEM;
            break;
        }
        if (sub == TWO_SPARSE) {
            r = create_file(path, &f);
            if (r < 0)
                break;
            r = vd_vmdk_sparse_write_new(f, n, zeroed ? 2 : 1,
                                      VMDK_FLAG_NL_TEST | VMDK_FLAG_RGD | (zeroed ? VMDK_FLAG_ZERO_GTE : 0),
                                      NULL, 0, path);
            if (r >= 0)
                r = vd_file_sync(f);
            vd_file_close(f);
        } else {
            r = make_flat(path, n * VMDK_SECTOR, o->prealloc);
        }
    }
out:
    free(path);
    free(d.p);
    return r < 0 ? r : 0;
}
