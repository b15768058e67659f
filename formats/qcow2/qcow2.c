/* The qcow2 format driver: probe, open/close, flush, info, set_backing and
 * the ops table. See docs/qcow2.md for what is supported and how the
 * write ordering keeps an image consistent across a crash. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "qcow2.h"

static int q2_probe(const uint8_t *buf, size_t len, struct vd_file *f)
{
    (void)f;
    if (len >= 8 && q2_be32(buf) == Q2_MAGIC) {
        uint32_t v = q2_be32(buf + 4);
        return (v == 2 || v == 3) ? 100 : 50;
    }
    return 0;
}

static void q2_free(struct q2 *s)
{
    if (!s)
        return;
    vd_q2_cache_fini(&s->l2c);
    vd_q2_cache_fini(&s->rcc);
    vd_q2_free_header(s);
    free(s->l1);
    free(s->rt);
    free(s->pf);
    free(s->cpend);
    free(s);
}

static size_t clamp(size_t v, size_t lo, size_t hi) { return v < lo ? lo : v > hi ? hi : v; }

static int load_l1(struct q2 *s)
{
    s->l1 = calloc(s->l1_size ? s->l1_size : 1, 8);
    if (!s->l1)
        return -ENOMEM;
    if (!s->l1_size)
        return 0;
    uint8_t *b = malloc((size_t)s->l1_size * 8);
    if (!b)
        return -ENOMEM;
    int r = vd_file_pread(s->f, b, (size_t)s->l1_size * 8, s->l1_off);
    if (r < 0) {
        free(b);
        return vd_err(r, "%s: reading the L1 table at 0x%llx failed", s->fname,
                      (unsigned long long)s->l1_off);
    }
    for (uint32_t i = 0; i < s->l1_size; i++)
        s->l1[i] = q2_be64(b + 8 * i);
    free(b);
    return 0;
}

static int q2_open(struct vd_layer *l)
{
    struct q2 *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->l = l;
    s->f = l->file;
    s->fname = l->filename;
    s->rw = !l->readonly;
    s->meta_prealloc = -1;
    uint64_t fsize;
    int r = vd_file_size(s->f, &fsize);
    uint8_t *hb = NULL;
    if (r < 0)
        goto fail;
    size_t want = fsize < (2u << 20) ? (size_t)fsize : (2u << 20);
    if (want >= 24) {
        /* read what cluster 0 can hold, no more */
        uint8_t first[24];
        if ((r = vd_file_pread(s->f, first, 24, 0)) < 0)
            goto fail;
        uint32_t cb = q2_be32(first + 20);
        if (cb >= Q2_MIN_CLUSTER_BITS && cb <= Q2_MAX_CLUSTER_BITS && (1ull << cb) < want)
            want = (size_t)(1ull << cb);
    }
    hb = malloc(want ? want : 1);
    if (!hb) {
        r = -ENOMEM;
        goto fail;
    }
    if ((r = vd_file_pread(s->f, hb, want, 0)) < 0)
        goto fail;
    if ((r = vd_q2_parse_header(s, hb, want, fsize)) < 0)
        goto fail;
    free(hb);
    hb = NULL;
    s->host_end = (fsize + s->cs - 1) & ~(s->cs - 1);
    s->linked_end = s->synced_end = s->host_end;
    if ((r = load_l1(s)) < 0 || (r = vd_q2_load_rt(s)) < 0 || (r = vd_q2_load_snapshots(s, fsize)) < 0)
        goto fail;
    if ((r = vd_q2_cache_init(&s->l2c, s, "L2 table", clamp((8u << 20) / s->cs, 8, 1024), s->cs,
                              vd_q2_l2_pre_write)) < 0 ||
        (r = vd_q2_cache_init(&s->rcc, s, "refcount block", clamp((4u << 20) / s->cs, 8, 256), s->cs,
                              vd_q2_rc_pre_write)) < 0)
        goto fail;
    if (s->rw) {
        if (s->incompat & Q2_INCOMPAT_CORRUPT) {
            r = vd_err(-EACCES, "%s: image is marked corrupt; it can only be opened read-only", s->fname);
            goto fail;
        }
        if (s->nb_snapshots) {
            r = vd_err(-ENOTSUP, "%s: image has internal snapshots; writing to it is not supported "
                       "(open it read-only)", s->fname);
            goto fail;
        }
        for (uint64_t i = 0; i < s->rt_entries; i++) {
            if (s->rt[i] && ((s->rt[i] & (s->cs - 1)) || s->rt[i] >= s->host_end)) {
                r = vd_err(-EIO, "%s: refcount table entry %llu points at 0x%llx, %s", s->fname,
                           (unsigned long long)i, (unsigned long long)s->rt[i],
                           (s->rt[i] & (s->cs - 1)) ? "not cluster aligned" : "past the end of the file");
                goto fail;
            }
        }
        if (s->autoclear) {
            /* we keep no auto-clear feature consistent: drop them before writing */
            uint8_t z[8] = {0};
            if ((r = vd_file_pwrite(s->f, z, 8, 88)) < 0 || (r = vd_file_sync(s->f)) < 0)
                goto fail;
            s->autoclear = 0;
        }
    }
    l->priv = s;
    l->size = s->size;
    l->cluster_size = (uint32_t)s->cs;
    l->alloc_unit = s->rw ? (uint32_t)s->cs : 0;
    if (s->backing && !(l->backing_name = strdup(s->backing))) {
        r = -ENOMEM;
        goto fail_priv;
    }
    if (s->backing && s->backing_fmt && !(l->backing_fmt = strdup(s->backing_fmt))) {
        r = -ENOMEM;
        goto fail_priv;
    }
    if (s->rw && (s->incompat & Q2_INCOMPAT_DIRTY)) {
        /* refcounts may be stale after an unclean shutdown: rebuild them */
        struct vd_check c = { .image_end_offset = -1 };
        if ((r = vd_q2_check(l, VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS, &c)) < 0)
            goto fail_priv;
        if (c.corruptions > c.corruptions_fixed) {
            r = vd_err(-EIO, "%s: image was not closed cleanly and could not be repaired", s->fname);
            goto fail_priv;
        }
        if ((r = vd_q2_update_incompat(s, s->incompat & ~Q2_INCOMPAT_DIRTY)) < 0)
            goto fail_priv;
    }
    return 0;
fail_priv:
    free(l->backing_name);
    free(l->backing_fmt);
    l->backing_name = l->backing_fmt = NULL;
    l->priv = NULL;
fail:
    free(hb);
    q2_free(s);
    return r;
}

static void q2_close(struct vd_layer *l)
{
    struct q2 *s = l->priv;
    if (!s)
        return;
    if (s->rw) {
        int r = vd_q2_flush_all(s);
        if (r == 0)
            r = vd_file_sync(s->f);
        if (r == 0 && s->dirty_on_disk)
            vd_q2_update_incompat(s, s->incompat & ~Q2_INCOMPAT_DIRTY);
    }
    q2_free(s);
    l->priv = NULL;
}

static int q2_flush(struct vd_layer *l)
{
    return vd_q2_flush_all(l->priv);
}

static int q2_info(struct vd_layer *l, json_t *info)
{
    struct q2 *s = l->priv;
    json_object_set_new(info, "cluster-size", json_integer((json_int_t)s->cs));
    json_object_set_new(info, "dirty-flag", json_boolean(s->incompat & Q2_INCOMPAT_DIRTY));
    json_t *d = json_object();
    json_object_set_new(d, "compat", json_string(s->version >= 3 ? "1.1" : "0.10"));
    json_object_set_new(d, "compression-type", json_string(s->ctype == Q2_CT_ZSTD ? "zstd" : "zlib"));
    if (s->version >= 3)
        json_object_set_new(d, "lazy-refcounts", json_boolean(s->compat & Q2_COMPAT_LAZY));
    json_object_set_new(d, "refcount-bits", json_integer(s->refcount_bits));
    if (s->version >= 3) {
        json_object_set_new(d, "corrupt", json_boolean(s->incompat & Q2_INCOMPAT_CORRUPT));
        json_object_set_new(d, "extended-l2", json_boolean(s->ext_l2));
    }
    json_t *fs = json_object();
    json_object_set_new(fs, "type", json_string("qcow2"));
    json_object_set_new(fs, "data", d);
    json_object_set_new(info, "format-specific", fs);
    if (s->nb_snapshots) {
        json_t *a = json_array();
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
            const struct q2_snap *sn = &s->snaps[i];
            json_t *o = json_object();
            if (sn->has_icount)
                json_object_set_new(o, "icount", json_integer((json_int_t)sn->icount));
            json_object_set_new(o, "vm-clock-nsec", json_integer((json_int_t)(sn->vm_clock_nsec % 1000000000)));
            json_object_set_new(o, "name", json_string(sn->name));
            json_object_set_new(o, "date-sec", json_integer(sn->date_sec));
            json_object_set_new(o, "date-nsec", json_integer(sn->date_nsec));
            json_object_set_new(o, "vm-clock-sec", json_integer((json_int_t)(sn->vm_clock_nsec / 1000000000)));
            json_object_set_new(o, "id", json_string(sn->id));
            json_object_set_new(o, "vm-state-size", json_integer((json_int_t)sn->vm_state_size));
            json_array_append_new(a, o);
        }
        json_object_set_new(info, "snapshots", a);
    }
    return 0;
}

static int q2_set_backing(struct vd_layer *l, const char *name, const char *fmt)
{
    struct q2 *s = l->priv;
    if (!s->rw)
        return vd_err(-EROFS, "%s: image is read-only", s->fname);
    if (name && strlen(name) > Q2_MAX_BACKING_NAME)
        return vd_err(-EINVAL, "%s: backing file name longer than %d bytes", s->fname, Q2_MAX_BACKING_NAME);
    if (fmt && strlen(fmt) > 63)
        return vd_err(-EINVAL, "%s: backing format name too long", s->fname);
    char *nb = name ? strdup(name) : NULL, *nf = (name && fmt) ? strdup(fmt) : NULL;
    char *ob = s->backing, *of = s->backing_fmt;
    s->backing = nb;
    s->backing_fmt = nf;
    int r = vd_q2_flush_all(s);
    if (r == 0)
        r = vd_q2_write_header(s);
    if (r < 0) {
        s->backing = ob;
        s->backing_fmt = of;
        free(nb);
        free(nf);
        return r;
    }
    free(ob);
    free(of);
    free(l->backing_name);
    free(l->backing_fmt);
    l->backing_name = nb ? strdup(nb) : NULL;
    l->backing_fmt = nf ? strdup(nf) : NULL;
    return 0;
}

static const char *const q2_aliases[] = { NULL };

static const struct vd_create_opt_desc q2_create_opts[] = {
    { "size", "virtual disk size" },
    { "compat", "qcow2 compatibility level: 0.10 (v2) or 1.1 (v3, default)" },
    { "cluster_size", "qcow2 cluster size: 512 to 2M, a power of two (default 64K)" },
    { "refcount_bits", "width of a reference count entry: 1, 2, 4, 8, 16 (default), 32 or 64" },
    { "extended_l2", "extended L2 entries with 32 subclusters (on/off; needs 16K clusters or more)" },
    { "lazy_refcounts", "postpone refcount updates (on/off, compat=1.1 only)" },
    { "compression_type", "compression for compressed clusters: zlib (default) or zstd" },
    { "preallocation", "off, metadata, falloc or full" },
    { "provisioning", "thin, lazy-zeroed or eager-zeroed" },
    { "backing_file", "file name of a base image" },
    { "backing_fmt", "format of the base image" },
    { NULL, NULL }
};

const struct vd_format vd_format_qcow2 = {
    .name = "qcow2",
    .aliases = q2_aliases,
    .probe = q2_probe,
    .open = q2_open,
    .close = q2_close,
    .create = vd_q2_create,
    .map = vd_q2_map,
    .alloc = vd_q2_alloc_op,
    .commit = vd_q2_commit,
    .read_compressed = vd_q2_read_compressed,
    .write_compressed = vd_q2_write_compressed,
    .discard = vd_q2_discard,
    .zero = vd_q2_zero,
    .flush = q2_flush,
    .resize = vd_q2_resize,
    .check = vd_q2_check,
    .info = q2_info,
    .set_backing = q2_set_backing,
    .create_opts = q2_create_opts,
    .compress = vd_q2_compress,
    .write_compressed_raw = vd_q2_write_compressed_raw,
};
