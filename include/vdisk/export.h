/* The daemon's export table: named, opened disks served by a frontend
 * ("nbd", "vhost-user-blk", ...). Each frontend is an export type: a small
 * ops struct registered from its own file with a constructor:
 *
 *     static const struct vd_export_type vhost_type = {
 *         .name = "vhost-user-blk", .start = ..., .stop = ..., .stats = ...,
 *     };
 *     __attribute__((constructor)) static void reg(void) { vd_export_type_register(&vhost_type); }
 *
 * The table owns the disk; types only serve it. Also here: per-export
 * statistics and the daemon's log. Thread-safe unless noted. */
#ifndef VDISK_EXPORT_H
#define VDISK_EXPORT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include "block.h"
#include "opts.h"

struct vd_export;

struct vd_export_type {
    const char *name;
    /* The disk is open (e->disk): start serving. Type-specific options are
     * in e->opts (read them with vd_opts_get*, which marks them used; keys
     * nobody used make export-add fail). 0 or -errno with vd_err(). */
    int  (*start)(struct vd_export *e);
    /* Stop serving: refuse new users and make the current ones drop their
     * references (vd_export_put) once their in-flight requests are done.
     * May return before that; vd_export_del waits, then flushes and closes. */
    void (*stop)(struct vd_export *e);
    /* Add type-specific figures (e.g. "connections") to the stats object. */
    void (*stats)(struct vd_export *e, json_t *out);
    /* Optional: the disk was resized (block-resize); tell the users. */
    int  (*resized)(struct vd_export *e);
};

void vd_export_type_register(const struct vd_export_type *t);
const struct vd_export_type *vd_export_type_find(const char *name);

/* Statistics: one slot per operation. */
enum vd_stat_op {
    VD_STAT_READ, VD_STAT_WRITE, VD_STAT_FLUSH, VD_STAT_DISCARD, VD_STAT_WRITE_ZEROES,
    VD_STAT_CACHE, VD_STAT_BLOCK_STATUS, VD_STAT_NOPS
};
#define VD_STAT_BUCKETS 336      /* log-linear latency buckets (8 per power of two, ns) */
struct vd_stat_slot {
    atomic_uint_fast64_t ops, bytes, errors;
    atomic_uint_fast64_t lat[VD_STAT_BUCKETS];
};

struct vd_export {
    char *name;
    char *description;          /* may be NULL */
    char *filename;
    char *format;               /* the format that opened it */
    const struct vd_export_type *type;
    struct vd_disk *disk;
    bool readonly;
    bool discard_unmap;
    struct vd_opts opts;        /* the add options (type-specific keys too) */
    void *priv;                 /* the type's state */
    /* private to the table */
    atomic_int refs;
    atomic_bool removing;
    struct vd_stat_slot stats[VD_STAT_NOPS];
    struct vd_export *next;
};

/* Add an export from "name=N,file=F[,format=..][,readonly=on][,cache=..]
 * [,aio=..][,discard=unmap|ignore][,type=nbd][,description=..][,type keys]".
 * name defaults to "" for the first export, else the file's basename.
 * Opens the disk (locked) and starts the type. */
int  vd_export_add(const char *spec, struct vd_export **out);
/* Same from parsed options (o is consumed). */
int  vd_export_add_opts(struct vd_opts *o, struct vd_export **out);
/* Remove: hidden at once, the type stops, every user drains and drops its
 * reference, then the disk is flushed and closed. Blocks until done (a
 * cluster round trip or more on RBD), so call it from a thread that serves
 * nothing (the control socket's command thread, or the daemon's main thread
 * at shutdown once its loop has stopped). */
int  vd_export_del(const char *name);
/* Remove every export (shutdown). */
void vd_export_del_all(void);

/* Find a live export of the given type (NULL: any) and take a reference. */
struct vd_export *vd_export_get(const char *name, const char *type);
void vd_export_ref(struct vd_export *e);
void vd_export_put(struct vd_export *e);
/* The resize control commands (block-resize, vhost-user-blk-resize):
 * args {"name", "size"}; type NULL takes any export. 0 or -errno (vd_err). */
int vd_export_resize_cmd(const char *cmd, const char *type, json_t *args);
/* Call fn for every live export under the table lock (fn must not call
 * back into the table). */
void vd_export_foreach(void (*fn)(struct vd_export *e, void *opaque), void *opaque);
size_t vd_export_count(void);

/* Record one finished operation (ns: latency, res: 0 or -errno). */
void vd_export_stat(struct vd_export *e, enum vd_stat_op op, uint64_t bytes, uint64_t ns, int res);
json_t *vd_export_info_json(struct vd_export *e);
json_t *vd_export_stats_json(struct vd_export *e);
/* Percentile (0 < p < 100) of a slot's latencies in ns; 0 when empty. */
uint64_t vd_stat_percentile(const struct vd_stat_slot *s, double p);
uint64_t vd_now_ns(void);

/* ---- log ---- */
enum vd_log_level { VD_LOG_ERROR, VD_LOG_WARN, VD_LOG_INFO, VD_LOG_DEBUG };
/* to_syslog: else stderr. */
void vd_log_setup(bool to_syslog, enum vd_log_level level, const char *ident);
int  vd_log_level_parse(const char *s, enum vd_log_level *out);
void vd_log(enum vd_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool vd_log_enabled(enum vd_log_level level);

#endif
