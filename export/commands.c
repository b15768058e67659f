/* Built-in control commands over the export table: export-add,
 * export-del, query-exports, query-stats, query-version. (quit belongs to
 * the daemon's main, which owns the process.) */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include "vdisk/control.h"
#include "vdisk/error.h"
#include "vdisk/export.h"

/* JSON arguments → "key=value" options (booleans as on/off). */
static int args_to_opts(json_t *args, struct vd_opts *o)
{
    const char *key;
    json_t *v;
    json_object_foreach(args, key, v) {
        char num[32];
        const char *s;
        if (json_is_string(v))
            s = json_string_value(v);
        else if (json_is_true(v))
            s = "on";
        else if (json_is_false(v))
            s = "off";
        else if (json_is_integer(v)) {
            snprintf(num, sizeof num, "%lld", (long long)json_integer_value(v));
            s = num;
        } else
            return vd_err(-EINVAL, "argument '%s' must be a string, a number or a boolean", key);
        int r = vd_opts_set(o, key, s);
        if (r < 0)
            return r;
    }
    return 0;
}

static int cmd_export_add(json_t *args, json_t **ret)
{
    struct vd_opts o = {0};
    int r = args_to_opts(args, &o);
    if (r < 0) {
        vd_opts_free(&o);
        return r;
    }
    struct vd_export *e;
    r = vd_export_add_opts(&o, &e);
    if (r < 0)
        return r;
    /* e stays valid: only export-del on this same thread removes it. */
    *ret = vd_export_info_json(e);
    vd_control_event("EXPORT_ADDED", json_pack("{s:s}", "name", e->name));
    return 0;
}

static int cmd_export_del(json_t *args, json_t **ret)
{
    const char *name = json_string_value(json_object_get(args, "name"));
    const char *mode = json_string_value(json_object_get(args, "mode"));
    if (!name)
        return vd_err(-EINVAL, "export-del needs \"name\"");
    if (mode && strcmp(mode, "safe") && strcmp(mode, "hard"))
        return vd_err(-EINVAL, "mode must be \"safe\" or \"hard\"");
    if (mode && !strcmp(mode, "safe")) {
        struct vd_export *e = vd_export_get(name, NULL);
        if (!e || strcmp(e->name, name)) {
            if (e)
                vd_export_put(e);
            return vd_err(-ENOENT, "no export named '%s'", name);
        }
        int users = atomic_load(&e->refs) - 2;   /* minus the table's and ours */
        vd_export_put(e);
        if (users > 0)
            return vd_err(-EBUSY, "export '%s' has %d user(s); use mode \"hard\" to disconnect them", name, users);
    }
    int r = vd_export_del(name);
    if (r < 0 && r != -ENOENT) {
        /* Removed, but the final flush or close failed: say so. */
        vd_control_event("EXPORT_DELETED", json_pack("{s:s,s:b}", "name", name, "clean", 0));
        return r;
    }
    if (r < 0)
        return r;
    vd_control_event("EXPORT_DELETED", json_pack("{s:s,s:b}", "name", name, "clean", 1));
    return 0;
}

/* Resize an export's disk: block-resize {"name": N, "size": BYTES} (type
 * NULL: any export), and the same for vhost-user-blk-resize (its type
 * only). The export's type tells its users if it can (vhost-user-blk: a
 * config change). New NBD connections see the new size; those already
 * open keep the old one. */
int vd_export_resize_cmd(const char *cmd, const char *type, json_t *args)
{
    const char *name = json_string_value(json_object_get(args, "name"));
    json_t *jsize = json_object_get(args, "size");
    if (!name || !json_is_integer(jsize) || json_integer_value(jsize) <= 0)
        return vd_err(-EINVAL, "%s needs name and a positive size", cmd);
    uint64_t size = (uint64_t)json_integer_value(jsize);
    if (size % 512)
        return vd_err(-EINVAL, "size %llu is not a multiple of 512", (unsigned long long)size);
    struct vd_export *e = vd_export_get(name, type);
    if (!e || strcmp(e->name, name)) {
        if (e)
            vd_export_put(e);
        return vd_err(-ENOENT, "no %s%sexport named '%s'", type ? type : "", type ? " " : "", name);
    }
    int r = e->readonly ? vd_err(-EROFS, "export '%s' is read-only", name)
                        : vd_disk_resize(e->disk, size, VD_PREALLOC_OFF);
    if (r == 0 && e->type->resized)
        r = e->type->resized(e);
    if (r == 0)
        vd_log(VD_LOG_INFO, "export '%s': resized to %llu bytes", name, (unsigned long long)size);
    vd_export_put(e);
    return r;
}

static int cmd_block_resize(json_t *args, json_t **ret)
{
    *ret = NULL;
    return vd_export_resize_cmd("block-resize", NULL, args);
}

static void add_info(struct vd_export *e, void *opaque)
{
    json_array_append_new(opaque, vd_export_info_json(e));
}

static int cmd_query_exports(json_t *args, json_t **ret)
{
    json_t *a = json_array();
    vd_export_foreach(add_info, a);
    *ret = a;
    return 0;
}

struct stats_ctx {
    json_t *a;
    const char *name;
};

static void add_stats(struct vd_export *e, void *opaque)
{
    struct stats_ctx *s = opaque;
    if (!s->name || !strcmp(s->name, e->name))
        json_array_append_new(s->a, vd_export_stats_json(e));
}

static int cmd_query_stats(json_t *args, json_t **ret)
{
    struct stats_ctx s = { json_array(), json_string_value(json_object_get(args, "name")) };
    vd_export_foreach(add_stats, &s);
    if (s.name && json_array_size(s.a) == 0) {
        json_decref(s.a);
        return vd_err(-ENOENT, "no export named '%s'", s.name);
    }
    *ret = s.a;
    return 0;
}

static int cmd_query_version(json_t *args, json_t **ret)
{
    *ret = json_pack("{s:s,s:s}", "program", "vdiskd", "version", VDISK_VERSION);
    return 0;
}

__attribute__((constructor)) static void register_commands(void)
{
    /* they open, drain, flush and close disks: off the loop */
    vd_control_register_blocking("export-add", cmd_export_add);
    vd_control_register_blocking("export-del", cmd_export_del);
    vd_control_register_blocking("block-resize", cmd_block_resize);
    vd_control_register("query-exports", cmd_query_exports);
    vd_control_register("query-stats", cmd_query_stats);
    vd_control_register("query-version", cmd_query_version);
}
