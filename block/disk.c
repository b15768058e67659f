/* Disks: opening an image and its backing chain, closing, block status,
 * create and resize, and the synchronous request wrappers. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <libgen.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "vdisk/error.h"
#include "disk_internal.h"
#include "block/file_int.h"

#define MAX_CHAIN 1024

static void layer_close(struct vd_layer *l)
{
    while (l) {
        struct vd_layer *below = l->backing;
        if (l->opened)
            l->fmt->close(l);
        vd_file_close(l->file);
        pthread_mutex_destroy(&l->lock);
        free(l->filename);
        free(l->backing_name);
        free(l->backing_fmt);
        free(l);
        l = below;
    }
}

static bool is_protocol_name(const char *name)
{
    return !vd_file_name_is_local(name);
}

/* The backing file name as recorded, resolved against the image's folder. */
char *vd_backing_path(const char *image, const char *backing)
{
    if (backing[0] == '/' || is_protocol_name(backing) || is_protocol_name(image))
        return strdup(backing);
    char *copy = strdup(image);
    if (!copy)
        return NULL;
    const char *dir = dirname(copy);
    char *out = NULL;
    if (!strcmp(dir, "."))
        out = strdup(backing);
    else if (asprintf(&out, "%s/%s", dir, backing) < 0)
        out = NULL;
    free(copy);
    return out;
}

/* parent: the layer whose backing file this is, or NULL for the top. */
static int layer_open(const char *filename, const char *fmt_name, const struct vd_open_opts *o,
                      bool readonly, const struct vd_layer *parent, struct vd_layer **out)
{
    struct vd_layer *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    pthread_mutex_init(&l->lock, NULL);
    l->filename = strdup(filename);
    l->readonly = readonly;
    l->cache = o->cache;
    l->discard_unmap = !o->discard_ignore;
    int ret = l->filename ? 0 : -ENOMEM;
    const struct vd_format *fmt = NULL;
    if (ret == 0 && fmt_name) {
        fmt = vd_format_find(fmt_name);
        if (!fmt)
            ret = vd_err(-EINVAL, "Unknown file format '%s'", fmt_name);
    }
    if (ret == 0)
        ret = vd_file_open(filename, (readonly ? VD_FILE_RDONLY : 0) | (o->nolock ? VD_FILE_NOLOCK : 0),
                           o->cache, &l->file);
    if (ret == 0 && !fmt) {
        /* Probed by content; a file no format claims is never taken for
         * raw, for a backing file either: its format must be recorded. */
        ret = vd_format_probe(l->file, &fmt);
        if (ret == -EINVAL && parent)
            ret = vd_err(-EINVAL, "%s: image format not recognised, and %s does not record the "
                         "format of its backing file; if it is raw, record that: "
                         "vdisk rebase -u -b %s -F raw %s", filename, parent->filename,
                         parent->backing_name, parent->filename);
    }
    if (ret == 0) {
        l->fmt = fmt;
        ret = fmt->open(l);
        if (ret < 0 && !strstr(vd_errmsg(ret), filename))
            vd_err_prefix(ret, "%s", filename);
        l->opened = ret == 0;   /* a failed open cleans up after itself */
    }
    if (ret < 0) {
        layer_close(l);
        return ret;
    }
    *out = l;
    return 0;
}

/* Identity of a layer's file for loop detection: device and inode for local
 * files, the name otherwise. */
static int same_file(struct vd_layer *a, const char *name)
{
    struct stat sa, sb;
    if (a->file->fd >= 0 && stat(name, &sb) == 0 && fstat(a->file->fd, &sa) == 0)
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    return strcmp(a->filename, name) == 0;
}

static int open_chain(struct vd_disk *d, const struct vd_open_opts *o)
{
    struct vd_layer *l = d->top;
    d->depth = 1;
    while (l->backing_name && !o->no_backing) {
        char *name = vd_backing_path(l->filename, l->backing_name);
        if (!name)
            return -ENOMEM;
        for (struct vd_layer *p = d->top; p; p = p->backing)
            if (same_file(p, name)) {
                int r = vd_err(-ELOOP, "%s: backing chain loop: '%s' is already in the chain",
                               l->filename, name);
                free(name);
                return r;
            }
        if (d->depth >= MAX_CHAIN) {
            free(name);
            return vd_err(-ELOOP, "%s: backing chain longer than %d images", d->top->filename,
                          MAX_CHAIN);
        }
        struct vd_open_opts bo = *o;
        bo.nolock = true;           /* several children may share a base */
        int r = layer_open(name, l->backing_fmt, &bo, true, l, &l->backing);
        if (r < 0) {
            vd_err_prefix(r, "Could not open backing file of %s", l->filename);
            free(name);
            return r;
        }
        free(name);
        if (l->fmt->backing_opened && (r = l->fmt->backing_opened(l)) < 0)
            return r;
        l = l->backing;
        d->depth++;
    }
    return 0;
}

int vd_disk_open(const char *filename, const struct vd_open_opts *o, struct vd_disk **out)
{
    static const struct vd_open_opts defaults;
    if (!o)
        o = &defaults;
    struct vd_disk *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->opts = *o;
    d->readonly = o->readonly;
    int r = layer_open(filename, o->format, o, o->readonly, NULL, &d->top);
    if (r == 0)
        r = open_chain(d, o);
    if (r < 0) {
        if (d->top)
            layer_close(d->top);
        free(d);
        return r;
    }
    vd_disk_gate_init(d);
    *out = d;
    return 0;
}

int vd_layer_flush_sync(struct vd_layer *l)
{
    int r = 0;
    if (l->readonly)
        return 0;
    if (l->fmt->flush) {
        pthread_mutex_lock(&l->lock);
        r = l->fmt->flush(l);
        pthread_mutex_unlock(&l->lock);
    }
    if (r == 0)
        r = vd_file_sync(l->file);
    return r;
}

int vd_disk_close(struct vd_disk *d)
{
    if (!d)
        return 0;
    int r = d->readonly ? 0 : vd_layer_flush_sync(d->top);
    layer_close(d->top);
    vd_disk_gate_fini(d);
    free(d);
    return r;
}

int vd_disk_sync_now(struct vd_disk *d)
{
    if (!d || d->readonly)
        return 0;
    vd_file_force_sync_begin();
    int r = vd_layer_flush_sync(d->top);
    vd_file_force_sync_end();
    return r;
}

int vd_disk_close_durable(struct vd_disk *d)
{
    /* The format's close may write once more after the flush (qcow2
     * clears its dirty bit) and syncs that itself: forced too. */
    vd_file_force_sync_begin();
    int r = vd_disk_close(d);
    vd_file_force_sync_end();
    return r;
}

uint64_t vd_disk_size(const struct vd_disk *d) { return d->top->size; }
struct vd_layer *vd_disk_top(struct vd_disk *d) { return d->top; }
int vd_disk_depth(const struct vd_disk *d) { return d->depth; }

/* ---- synchronous reads of a layer (copy-on-write fills, slow paths) ---- */

int vd_layer_pread(struct vd_layer *l, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len) {
        if (off >= l->size) {
            memset(p, 0, len);
            return 0;
        }
        uint64_t want = len < l->size - off ? len : l->size - off;
        struct vd_map m = {0};
        pthread_mutex_lock(&l->lock);
        int r = l->fmt->map(l, off, want, 0, &m);
        pthread_mutex_unlock(&l->lock);
        if (r < 0)
            return r;
        size_t n = (size_t)(m.len < want ? m.len : want);
        if (n == 0)
            return vd_err(-EIO, "%s: format mapped no bytes at offset %llu", l->filename,
                          (unsigned long long)off);
        switch (m.kind) {
        case VD_MAP_DATA:
            r = vd_file_pread(m.file, p, n, m.host_off);
            break;
        case VD_MAP_ZERO:
            memset(p, 0, n);
            break;
        case VD_MAP_UNALLOC:
            if (l->backing)
                r = vd_layer_pread(l->backing, p, n, off);
            else
                memset(p, 0, n);
            break;
        case VD_MAP_COMPRESSED: {
            if (!l->fmt->read_compressed || off < m.comp_voff ||
                off - m.comp_voff + n > m.comp_unit)
                return vd_err(-EIO, "%s: bad compressed mapping at offset %llu", l->filename,
                              (unsigned long long)off);
            char *u = malloc(m.comp_unit);
            if (!u)
                return -ENOMEM;
            pthread_mutex_lock(&l->lock);
            r = l->fmt->read_compressed(l, &m, u);
            pthread_mutex_unlock(&l->lock);
            if (r == 0)
                memcpy(p, u + (off - m.comp_voff), n);
            free(u);
            break;
        }
        }
        if (r < 0)
            return r;
        p += n;
        off += n;
        len -= n;
    }
    return 0;
}

/* ---- block status ---- */

void vd_map_file_status(struct vd_map *m)
{
    bool is_data;
    uint64_t end;
    if (vd_file_extent(m->file, m->host_off, &is_data, &end) < 0 || end <= m->host_off)
        return;
    if (end - m->host_off < m->len)
        m->len = end - m->host_off;
    if (!is_data) {
        m->kind = VD_MAP_ZERO;
        m->host_valid = true;
    }
}

int vd_disk_block_status(struct vd_disk *d, uint64_t off, uint64_t len, struct vd_extent *e)
{
    struct vd_layer *l = d->top;
    if (off >= l->size || len == 0)
        return vd_err(-EINVAL, "%s: block status at offset %llu is past the end",
                      l->filename, (unsigned long long)off);
    if (len > l->size - off)
        len = l->size - off;
    memset(e, 0, sizeof(*e));
    e->off = off;
    for (int depth = 0;; depth++) {
        struct vd_map m = {0};
        pthread_mutex_lock(&l->lock);
        int r = l->fmt->map(l, off, len, VD_MAP_F_STATUS, &m);
        pthread_mutex_unlock(&l->lock);
        if (r < 0)
            return r;
        if (m.len == 0)
            return vd_err(-EIO, "%s: format mapped no bytes at offset %llu", l->filename,
                          (unsigned long long)off);
        if (m.len < len)
            len = m.len;
        e->depth = depth;
        e->len = len;
        switch (m.kind) {
        case VD_MAP_DATA:
            e->flags = VD_EXT_DATA | VD_EXT_ALLOCATED | VD_EXT_OFFSET;
            if (m.reads_zero)
                e->flags |= VD_EXT_ZERO;
            e->file = m.file;
            e->host_off = m.host_off;
            return 0;
        case VD_MAP_ZERO:
            e->flags = VD_EXT_ZERO | VD_EXT_ALLOCATED;
            if (m.host_valid) {
                e->flags |= VD_EXT_OFFSET;
                e->file = m.file;
                e->host_off = m.host_off;
            }
            return 0;
        case VD_MAP_COMPRESSED:
            e->flags = VD_EXT_DATA | VD_EXT_ALLOCATED | VD_EXT_COMPRESSED;
            return 0;
        case VD_MAP_UNALLOC:
            if (!l->backing || off >= l->backing->size) {
                e->flags = VD_EXT_ZERO;     /* reads as zeros, allocated nowhere */
                if (m.host_valid) {         /* space reserved for it (qcow2 subclusters) */
                    e->flags |= VD_EXT_OFFSET;
                    e->file = m.file;
                    e->host_off = m.host_off;
                }
                return 0;
            }
            if (len > l->backing->size - off)
                len = l->backing->size - off;
            l = l->backing;
            break;
        }
    }
}

/* ---- create and resize ---- */

int vd_prealloc_from_opts(struct vd_opts *opts, enum vd_prealloc *out)
{
    const char *p = vd_opts_get(opts, "preallocation");
    const char *v = vd_opts_get(opts, "provisioning");
    *out = VD_PREALLOC_OFF;
    if (p && v)
        return vd_err(-EINVAL, "Give provisioning= or preallocation=, not both");
    if (p) {
        static const char *names[] = {"off", "metadata", "falloc", "full"};
        for (int i = 0; i < 4; i++)
            if (!strcmp(p, names[i])) {
                *out = (enum vd_prealloc)i;
                return 0;
            }
        return vd_err(-EINVAL, "Invalid preallocation mode '%s' (off, metadata, falloc or full)", p);
    }
    if (v) {
        if (!strcmp(v, "thin"))
            *out = VD_PREALLOC_OFF;
        else if (!strcmp(v, "lazy-zeroed"))
            *out = VD_PREALLOC_FALLOC;
        else if (!strcmp(v, "eager-zeroed"))
            *out = VD_PREALLOC_FULL;
        else
            return vd_err(-EINVAL, "Invalid provisioning '%s' (thin, lazy-zeroed or eager-zeroed)", v);
    }
    return 0;
}

int vd_image_create(const char *filename, const char *fmt_name, struct vd_create_opts *o)
{
    const struct vd_format *fmt = vd_format_find(fmt_name);
    if (!fmt)
        return vd_err(-EINVAL, "Unknown file format '%s'", fmt_name);
    if (!fmt->create)
        return vd_err(-ENOTSUP, "Format '%s' does not support image creation", fmt->name);
    /* Every -o key must be one this format knows, before anything is written. */
    for (size_t i = 0; o->opts && i < o->opts->n; i++) {
        const char *k = o->opts->kv[i].key;
        bool known = false;
        for (const struct vd_create_opt_desc *c = fmt->create_opts; c && c->name; c++)
            if (!strcmp(c->name, k))
                known = true;
        if (!known)
            return vd_err(-EINVAL, "Invalid parameter '%s' for format '%s'", k, fmt->name);
    }
    if (o->backing && o->size == 0) {
        char *name = vd_backing_path(filename, o->backing);
        if (!name)
            return -ENOMEM;
        struct vd_open_opts bo = { .format = o->backing_fmt, .readonly = true, .nolock = true };
        struct vd_disk *b;
        int r = vd_disk_open(name, &bo, &b);
        free(name);
        if (r < 0)
            return vd_err_prefix(r, "Could not open backing image to determine size");
        o->size = vd_disk_size(b);
        vd_disk_close(b);
    }
    if (o->size > (uint64_t)INT64_MAX)
        return vd_err(-EINVAL, "%s: image size %llu is too large", filename,
                      (unsigned long long)o->size);
    int r = fmt->create(filename, o);
    if (r < 0 && !strstr(vd_errmsg(r), filename))
        vd_err_prefix(r, "%s", filename);
    return r;
}

int vd_disk_resize_now(struct vd_disk *d, uint64_t size, enum vd_prealloc prealloc)
{
    struct vd_layer *l = d->top;
    if (d->readonly)
        return vd_err(-EROFS, "%s: image is read-only", l->filename);
    if (!l->fmt->resize)
        return vd_err(-ENOTSUP, "%s: format '%s' cannot be resized", l->filename, l->fmt->name);
    pthread_mutex_lock(&l->lock);
    int r = l->fmt->resize(l, size, prealloc);
    if (r == 0)     /* loops read it unlocked when they check a request's range */
        __atomic_store_n(&l->size, size, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&l->lock);
    if (r == 0)
        r = vd_layer_flush_sync(l);
    return r;
}

struct wait_cb {
    bool done;
    int res;
};

static void wait_cb_done(void *opaque, int res)
{
    struct wait_cb *w = opaque;
    w->res = res;
    w->done = true;
}

int vd_disk_resize(struct vd_disk *d, uint64_t size, enum vd_prealloc prealloc)
{
    if (!d->remote)
        return vd_disk_resize_now(d, size, prealloc);
    struct vd_loop *loop = vd_loop_current();
    if (!loop)
        return vd_err(-ENOMEM, "cannot create an event loop");
    struct wait_cb w = {0};
    vd_disk_resize_async(d, size, prealloc, wait_cb_done, &w);
    while (!w.done)
        vd_loop_run_once(loop, -1);
    return w.res;
}

/* ---- synchronous wrappers: run this thread's loop until the request is done ---- */

struct sync_req {
    struct vd_req r;
    struct iovec iov;
    bool done;
    int res;
};

static void sync_done(struct vd_req *r, int res)
{
    struct sync_req *s = (struct sync_req *)r;
    s->res = res;
    s->done = true;
}

static int sync_run(struct vd_disk *d, enum vd_op op, void *buf, uint64_t len, uint64_t off,
                    unsigned flags)
{
    struct vd_loop *loop = vd_loop_current();
    if (!loop)
        return vd_err(-ENOMEM, "cannot create an event loop");
    struct sync_req s = { .iov = { buf, (size_t)len } };
    s.r = (struct vd_req){ .op = op, .flags = flags, .off = off, .len = len,
                           .iov = &s.iov, .iovcnt = buf ? 1 : 0, .done = sync_done };
    vd_disk_submit(d, &s.r);
    while (!s.done)
        vd_loop_run_once(loop, -1);
    return s.res;
}

int vd_disk_pread(struct vd_disk *d, void *buf, size_t len, uint64_t off)
{
    return sync_run(d, VD_OP_READ, buf, len, off, 0);
}

int vd_disk_pwrite(struct vd_disk *d, const void *buf, size_t len, uint64_t off, unsigned flags)
{
    return sync_run(d, VD_OP_WRITE, (void *)buf, len, off, flags);
}

int vd_disk_flush(struct vd_disk *d)
{
    return sync_run(d, VD_OP_FLUSH, NULL, 0, 0, 0);
}

int vd_disk_discard(struct vd_disk *d, uint64_t off, uint64_t len)
{
    return sync_run(d, VD_OP_DISCARD, NULL, len, off, 0);
}

int vd_disk_write_zeroes(struct vd_disk *d, uint64_t off, uint64_t len, unsigned flags)
{
    return sync_run(d, VD_OP_WRITE_ZEROES, NULL, len, off, flags);
}

/* ---- check reports ---- */

void vd_check_report(struct vd_check *c, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (c->report)
        c->report(c->report_opaque, msg);
}
