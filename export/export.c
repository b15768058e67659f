/* The export table: name → opened disk + the frontend type serving it.
 * One mutex guards the list; references (atomic) keep an export alive
 * while a connection or queue uses it, and removal waits for them. */
#include <errno.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/engine.h"
#include "vdisk/error.h"
#include "vdisk/export.h"

#define MAX_TYPES 16

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t released = PTHREAD_COND_INITIALIZER;
static struct vd_export *head;          /* oldest first */
static const struct vd_export_type *types[MAX_TYPES];
static size_t ntypes;

void vd_export_type_register(const struct vd_export_type *t)
{
    pthread_mutex_lock(&lock);
    if (ntypes < MAX_TYPES)
        types[ntypes++] = t;
    pthread_mutex_unlock(&lock);
}

const struct vd_export_type *vd_export_type_find(const char *name)
{
    const struct vd_export_type *t = NULL;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < ntypes && !t; i++)
        if (!strcmp(types[i]->name, name))
            t = types[i];
    pthread_mutex_unlock(&lock);
    return t;
}

/* Under lock. The empty name means the default export: one literally
 * named "" if any, else the oldest. */
static struct vd_export *find_locked(const char *name, bool live_only)
{
    for (struct vd_export *e = head; e; e = e->next)
        if (!strcmp(e->name, name) && (!live_only || !atomic_load(&e->removing)))
            return e;
    if (!name[0])
        for (struct vd_export *e = head; e; e = e->next)
            if (!live_only || !atomic_load(&e->removing))
                return e;
    return NULL;
}

static void free_export(struct vd_export *e)
{
    free(e->name);
    free(e->description);
    free(e->filename);
    free(e->format);
    vd_opts_free(&e->opts);
    free(e);
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s && s[1] ? s + 1 : path;
}

int vd_export_add(const char *spec, struct vd_export **out)
{
    struct vd_opts o = {0};
    int r = vd_opts_parse(&o, spec);
    if (r < 0) {
        vd_opts_free(&o);
        return r;
    }
    return vd_export_add_opts(&o, out);
}

int vd_export_add_opts(struct vd_opts *o, struct vd_export **out)
{
    struct vd_export *e = calloc(1, sizeof *e);
    struct vd_open_opts oo = {0};
    int r;
    if (!e) {
        vd_opts_free(o);
        return -ENOMEM;
    }
    e->opts = *o;
    memset(o, 0, sizeof *o);
    atomic_init(&e->refs, 1);
    atomic_init(&e->removing, false);

    const char *file = vd_opts_get(&e->opts, "file");
    const char *name = vd_opts_get(&e->opts, "name");
    const char *type = vd_opts_get(&e->opts, "type");
    const char *desc = vd_opts_get(&e->opts, "description");
    const char *s;
    if (!file || !file[0]) {
        r = vd_err(-EINVAL, "export needs file=PATH");
        goto fail;
    }
    e->filename = strdup(file);
    e->name = strdup(name ? name : base_name(file));
    e->description = desc ? strdup(desc) : NULL;
    if (!e->filename || !e->name || (desc && !e->description)) {
        r = -ENOMEM;
        goto fail;
    }
    if (strlen(e->name) > 4096) {
        r = vd_err(-EINVAL, "export name longer than 4096 bytes");
        goto fail;
    }
    e->type = vd_export_type_find(type ? type : "nbd");
    if (!e->type) {
        r = vd_err(-EINVAL, "unknown export type '%s'", type ? type : "nbd");
        goto fail;
    }
    oo.format = vd_opts_get(&e->opts, "format");
    if ((r = vd_opts_get_bool(&e->opts, "readonly", &oo.readonly)) < 0)
        goto fail;
    if ((s = vd_opts_get(&e->opts, "cache")) && (r = vd_cache_parse(s, &oo.cache)) < 0) {
        r = vd_err(r, "cache=%s: expected writeback, none, writethrough, directsync or unsafe", s);
        goto fail;
    }
    if ((s = vd_opts_get(&e->opts, "aio")) && (r = vd_aio_parse(s, &oo.aio)) < 0) {
        r = vd_err(r, "aio=%s: expected io_uring, native or threads", s);
        goto fail;
    }
    if ((s = vd_opts_get(&e->opts, "discard"))) {
        if (!strcmp(s, "ignore") || !strcmp(s, "off"))
            oo.discard_ignore = true;
        else if (strcmp(s, "unmap") && strcmp(s, "on")) {
            r = vd_err(-EINVAL, "discard=%s: expected unmap or ignore", s);
            goto fail;
        }
    }
    e->readonly = oo.readonly;
    e->discard_unmap = !oo.discard_ignore;

    pthread_mutex_lock(&lock);
    struct vd_export *dup = NULL;
    for (struct vd_export *x = head; x; x = x->next)
        if (!strcmp(x->name, e->name))
            dup = x;
    pthread_mutex_unlock(&lock);
    if (dup) {
        r = vd_err(-EEXIST, "an export named '%s' already exists", e->name);
        goto fail;
    }

    r = vd_disk_open(e->filename, &oo, &e->disk);
    if (r < 0) {
        vd_err_prefix(r, "export '%s'", e->name);
        goto fail;
    }
    struct vd_layer *top = vd_disk_top(e->disk);
    e->format = strdup(top && top->fmt ? top->fmt->name : "raw");
    r = e->type->start ? e->type->start(e) : 0;
    if (r < 0)
        goto fail_disk;
    if ((r = vd_opts_check_unused(&e->opts)) < 0) {
        if (e->type->stop)
            e->type->stop(e);
        goto fail_disk;
    }

    pthread_mutex_lock(&lock);
    for (struct vd_export *x = head; x; x = x->next)
        if (!strcmp(x->name, e->name))
            dup = x;
    if (!dup) {
        struct vd_export **pp = &head;
        while (*pp)
            pp = &(*pp)->next;
        *pp = e;
    }
    pthread_mutex_unlock(&lock);
    if (dup) {
        if (e->type->stop)
            e->type->stop(e);
        r = vd_err(-EEXIST, "an export named '%s' already exists", e->name);
        goto fail_disk;
    }
    vd_log(VD_LOG_INFO, "export '%s' added: %s (%s, %s%s)", e->name, e->filename, e->format,
           e->type->name, e->readonly ? ", read-only" : "");
    if (out)
        *out = e;
    return 0;

fail_disk:
    vd_disk_close(e->disk);
fail:
    free_export(e);
    return r;
}

void vd_export_ref(struct vd_export *e)
{
    atomic_fetch_add(&e->refs, 1);
}

void vd_export_put(struct vd_export *e)
{
    if (atomic_load(&e->removing)) {
        /* Someone may be waiting in vd_export_del: wake it under the lock
         * so that the wake-up cannot be missed. */
        pthread_mutex_lock(&lock);
        atomic_fetch_sub(&e->refs, 1);
        pthread_cond_broadcast(&released);
        pthread_mutex_unlock(&lock);
        return;
    }
    atomic_fetch_sub(&e->refs, 1);
}

struct vd_export *vd_export_get(const char *name, const char *type)
{
    pthread_mutex_lock(&lock);
    struct vd_export *e = find_locked(name, true);
    if (e && type && strcmp(e->type->name, type))
        e = NULL;
    if (e)
        atomic_fetch_add(&e->refs, 1);
    pthread_mutex_unlock(&lock);
    return e;
}

static int remove_export(struct vd_export *e)
{
    /* Hidden from lookups already; let the type disconnect its users. */
    if (e->type->stop)
        e->type->stop(e);
    pthread_mutex_lock(&lock);
    while (atomic_load(&e->refs) > 1)
        pthread_cond_wait(&released, &lock);
    pthread_mutex_unlock(&lock);
    /* Close flushes a writable disk: what was acknowledged is on disk. */
    int r = vd_disk_close(e->disk);
    if (r < 0)
        vd_log(VD_LOG_ERROR, "export '%s': closing %s: %s", e->name, e->filename, vd_errmsg(r));
    else
        vd_log(VD_LOG_INFO, "export '%s' removed", e->name);
    free_export(e);
    return r;
}

int vd_export_del(const char *name)
{
    pthread_mutex_lock(&lock);
    struct vd_export **pp = &head, *e = NULL;
    for (; *pp; pp = &(*pp)->next)
        if (!strcmp((*pp)->name, name)) {
            e = *pp;
            *pp = e->next;
            atomic_store(&e->removing, true);
            break;
        }
    pthread_mutex_unlock(&lock);
    if (!e)
        return vd_err(-ENOENT, "no export named '%s'", name);
    return remove_export(e);
}

void vd_export_del_all(void)
{
    for (;;) {
        pthread_mutex_lock(&lock);
        struct vd_export *e = head;
        if (e) {
            head = e->next;
            atomic_store(&e->removing, true);
        }
        pthread_mutex_unlock(&lock);
        if (!e)
            return;
        remove_export(e);
    }
}

void vd_export_foreach(void (*fn)(struct vd_export *e, void *opaque), void *opaque)
{
    pthread_mutex_lock(&lock);
    for (struct vd_export *e = head; e; e = e->next)
        fn(e, opaque);
    pthread_mutex_unlock(&lock);
}

size_t vd_export_count(void)
{
    size_t n = 0;
    pthread_mutex_lock(&lock);
    for (struct vd_export *e = head; e; e = e->next)
        n++;
    pthread_mutex_unlock(&lock);
    return n;
}

json_t *vd_export_info_json(struct vd_export *e)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(e->name));
    json_object_set_new(o, "type", json_string(e->type->name));
    json_object_set_new(o, "file", json_string(e->filename));
    json_object_set_new(o, "format", json_string(e->format ? e->format : ""));
    json_object_set_new(o, "virtual-size", json_integer((json_int_t)vd_disk_size(e->disk)));
    json_object_set_new(o, "readonly", json_boolean(e->readonly));
    json_object_set_new(o, "discard", json_string(e->discard_unmap ? "unmap" : "ignore"));
    if (e->description)
        json_object_set_new(o, "description", json_string(e->description));
    json_object_set_new(o, "users", json_integer(atomic_load(&e->refs) - 1));
    return o;
}
