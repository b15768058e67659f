/* nbdkit-vdisk-plugin: serve any image vdisk opens (raw, qcow2, VMDK, VHD,
 * backing chains, nbd:// sources) through nbdkit.
 *
 *   nbdkit nbdkit-vdisk-plugin.so [file=]disk.vmdk [format=FMT] [readonly=BOOL]
 *          [cache=none|writeback] [aio=io_uring|native|threads]
 *          [discard=unmap|ignore]
 *
 * One disk is shared by every connection (so a flush on any connection
 * covers all of them: multi-conn is safe). It is opened when the first
 * client connects — read-only when nbdkit runs with -r or readonly=true —
 * after a read-only trial open at start-up has caught a missing file or an
 * unreadable image. nbdkit's worker threads are not loop threads: every
 * call uses the synchronous vd_disk_* functions, which run the calling
 * thread's own loop (created on first use, freed when the thread ends). */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vdisk/block.h"
#include "vdisk/engine.h"
#include "vdisk/error.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#define MAX_REQUEST (32u << 20)

static char *filename;
static struct vd_open_opts opts;
static bool cfg_readonly;

static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;
static struct vd_disk *disk;
static bool disk_readonly;

struct handle {
    bool readonly;
};

static int fail(int r, const char *what)
{
    nbdkit_error("%s: %s", what, vd_errmsg(r));
    nbdkit_set_error(-r);
    return -1;
}

static void vdisk_unload(void)
{
    if (disk)
        vd_disk_close(disk);
    disk = NULL;
    free(filename);
    free((char *)opts.format);
}

static int vdisk_config(const char *key, const char *value)
{
    if (!strcmp(key, "file")) {
        free(filename);
        filename = nbdkit_realpath(value);
        /* protocol names (nbd://…) are not paths */
        if (!filename && strstr(value, "://"))
            filename = strdup(value);
        if (!filename)
            return -1;
    } else if (!strcmp(key, "format")) {
        if (!vd_format_find(value)) {
            nbdkit_error("unknown image format '%s'", value);
            return -1;
        }
        free((char *)opts.format);
        opts.format = strdup(value);
    } else if (!strcmp(key, "readonly")) {
        int r = nbdkit_parse_bool(value);
        if (r < 0)
            return -1;
        cfg_readonly = r;
    } else if (!strcmp(key, "cache")) {
        if (vd_cache_parse(value, &opts.cache) < 0) {
            nbdkit_error("%s", vd_errmsg(-EINVAL));
            return -1;
        }
    } else if (!strcmp(key, "aio")) {
        if (vd_aio_parse(value, &opts.aio) < 0) {
            nbdkit_error("%s", vd_errmsg(-EINVAL));
            return -1;
        }
    } else if (!strcmp(key, "discard")) {
        if (!strcmp(value, "unmap"))
            opts.discard_ignore = false;
        else if (!strcmp(value, "ignore"))
            opts.discard_ignore = true;
        else {
            nbdkit_error("discard must be unmap or ignore, not '%s'", value);
            return -1;
        }
    } else {
        nbdkit_error("unknown parameter '%s'", key);
        return -1;
    }
    return 0;
}

static int vdisk_config_complete(void)
{
    if (!filename) {
        nbdkit_error("the image is missing: give file=IMAGE");
        return -1;
    }
    return 0;
}

#define vdisk_config_help \
    "file=<IMAGE>     (required) The image: raw, qcow2, vmdk, vhd, or nbd://…\n" \
    "format=<FMT>     Its format (default: probed; raw must be named).\n" \
    "readonly=<BOOL>  Open the image read-only.\n" \
    "cache=<MODE>     writeback (default), none (O_DIRECT), writethrough, directsync\n" \
    "                 or unsafe (no syncs: throwaway data).\n" \
    "aio=<ENGINE>     io_uring, native or threads (default: the first that works).\n" \
    "discard=<MODE>   unmap (free space on trim, default) or ignore."

struct trial {
    int r;
    char msg[512];
};

static void *trial_open(void *arg)
{
    struct trial *t = arg;
    struct vd_open_opts o = opts;
    o.readonly = true;
    o.nolock = true;
    struct vd_disk *d;
    t->r = vd_disk_open(filename, &o, &d);
    if (t->r < 0)
        snprintf(t->msg, sizeof(t->msg), "%s", vd_errmsg(t->r));
    else
        vd_disk_close(d);
    return NULL;
}

/* Catch a missing or unreadable image before nbdkit starts serving. The
 * trial runs on a thread of its own so that the event loop it needs ends
 * with it, before nbdkit forks into the background. */
static int vdisk_get_ready(void)
{
    struct trial t = { 0 };
    pthread_t th;
    if (pthread_create(&th, NULL, trial_open, &t) != 0)
        trial_open(&t);
    else
        pthread_join(th, NULL);
    if (t.r < 0) {
        nbdkit_error("%s", t.msg);
        return -1;
    }
    return 0;
}

static void *vdisk_open(int readonly)
{
    pthread_mutex_lock(&disk_lock);
    if (!disk) {
        struct vd_open_opts o = opts;
        o.readonly = cfg_readonly || readonly;
        int r = vd_disk_open(filename, &o, &disk);
        if (r < 0) {
            disk = NULL;
            pthread_mutex_unlock(&disk_lock);
            fail(r, filename);
            return NULL;
        }
        disk_readonly = o.readonly;
    }
    pthread_mutex_unlock(&disk_lock);
    struct handle *h = calloc(1, sizeof(*h));
    if (!h) {
        nbdkit_error("calloc: %m");
        return NULL;
    }
    h->readonly = readonly || disk_readonly;
    return h;
}

static void vdisk_close(void *handle)
{
    free(handle);
}

static int64_t vdisk_get_size(void *handle)
{
    return (int64_t)vd_disk_size(disk);
}

static int vdisk_block_size(void *handle, uint32_t *minimum, uint32_t *preferred,
                            uint32_t *maximum)
{
    *minimum = 1;
    *preferred = 4096;
    *maximum = MAX_REQUEST;
    return 0;
}

static int vdisk_can_write(void *handle)
{
    return !((struct handle *)handle)->readonly;
}

static int vdisk_can_flush(void *handle)    { return 1; }
static int vdisk_can_trim(void *handle)     { return 1; }
static int vdisk_can_zero(void *handle)     { return 1; }
static int vdisk_can_fast_zero(void *handle) { return 1; }
static int vdisk_can_fua(void *handle)      { return NBDKIT_FUA_NATIVE; }
static int vdisk_can_extents(void *handle)  { return 1; }
/* One disk object serves every connection: a flush covers them all. */
static int vdisk_can_multi_conn(void *handle) { return 1; }

static int vdisk_pread(void *handle, void *buf, uint32_t count, uint64_t offset,
                       uint32_t flags)
{
    int r = vd_disk_pread(disk, buf, count, offset);
    return r < 0 ? fail(r, "read") : 0;
}

static int vdisk_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                        uint32_t flags)
{
    int r = vd_disk_pwrite(disk, buf, count, offset,
                           (flags & NBDKIT_FLAG_FUA) ? VD_REQ_FUA : 0);
    return r < 0 ? fail(r, "write") : 0;
}

static int vdisk_flush(void *handle, uint32_t flags)
{
    int r = vd_disk_flush(disk);
    return r < 0 ? fail(r, "flush") : 0;
}

static int vdisk_trim(void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
    int r = vd_disk_discard(disk, offset, count);
    if (r == 0 && (flags & NBDKIT_FLAG_FUA))
        r = vd_disk_flush(disk);
    return r < 0 ? fail(r, "trim") : 0;
}

static int vdisk_zero(void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
    unsigned f = 0;
    if (flags & NBDKIT_FLAG_MAY_TRIM)
        f |= VD_REQ_MAY_UNMAP;
    if (flags & NBDKIT_FLAG_FAST_ZERO)
        f |= VD_REQ_FAST_ZERO;
    int r = vd_disk_write_zeroes(disk, offset, count, f);
    if (r == -ENOTSUP && (flags & NBDKIT_FLAG_FAST_ZERO)) {
        nbdkit_set_error(ENOTSUP);      /* not an error worth logging */
        return -1;
    }
    if (r == 0 && (flags & NBDKIT_FLAG_FUA))
        r = vd_disk_flush(disk);
    return r < 0 ? fail(r, "zero") : 0;
}

static int vdisk_extents(void *handle, uint32_t count, uint64_t offset, uint32_t flags,
                         struct nbdkit_extents *extents)
{
    uint64_t end = offset + count;
    while (offset < end) {
        struct vd_extent e;
        int r = vd_disk_block_status(disk, offset, end - offset, &e);
        if (r < 0)
            return fail(r, "block status");
        if (e.len == 0 || e.len > end - offset)
            e.len = end - offset;
        uint32_t type = 0;
        if (!(e.flags & VD_EXT_DATA))
            type |= NBDKIT_EXTENT_HOLE;
        if (e.flags & VD_EXT_ZERO)
            type |= NBDKIT_EXTENT_ZERO;
        if (nbdkit_add_extent(extents, offset, e.len, type) < 0)
            return -1;
        offset += e.len;
        if (flags & NBDKIT_FLAG_REQ_ONE)
            break;
    }
    return 0;
}

static struct nbdkit_plugin plugin = {
    .name = "vdisk",
    .longname = "vdisk: qcow2, VMDK, VHD and raw images",
    .version = VDISK_VERSION,
    .description = "Serves any image the vdisk block layer opens.",
    .unload = vdisk_unload,
    .config = vdisk_config,
    .config_complete = vdisk_config_complete,
    .config_help = vdisk_config_help,
    .magic_config_key = "file",
    .get_ready = vdisk_get_ready,
    .open = vdisk_open,
    .close = vdisk_close,
    .get_size = vdisk_get_size,
    .block_size = vdisk_block_size,
    .can_write = vdisk_can_write,
    .can_flush = vdisk_can_flush,
    .can_trim = vdisk_can_trim,
    .can_zero = vdisk_can_zero,
    .can_fast_zero = vdisk_can_fast_zero,
    .can_fua = vdisk_can_fua,
    .can_extents = vdisk_can_extents,
    .can_multi_conn = vdisk_can_multi_conn,
    .pread = vdisk_pread,
    .pwrite = vdisk_pwrite,
    .flush = vdisk_flush,
    .trim = vdisk_trim,
    .zero = vdisk_zero,
    .extents = vdisk_extents,
    .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN(plugin)
