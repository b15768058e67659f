/* The Ceph RBD protocol backend: images named
 *   rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=USER][:timeout=SECONDS]
 *       [:lock_timeout=SECONDS][:KEY=VALUE…]
 * as qemu-img spells them ('\' escapes ':', '/', '@' and '\' itself; every
 * KEY=VALUE other than conf, id, timeout and lock_timeout is a Ceph option,
 * rados_conf_set).
 *
 * Data I/O, discard and write-zeroes are asynchronous through librbd's aio calls; the completion
 * callback (on a librbd thread) only records the result and pushes the io
 * back to its loop (vd_loop_post_node: lock-free, one wake-up per batch),
 * so no thread is blocked per request. Metadata paths use
 * the synchronous calls. Block status comes from librbd's allocation diff,
 * cached per window. An image opened for writing holds RBD's exclusive lock
 * for as long as it is open, so two hosts never write one image at once.
 * Every cluster operation is bounded by a timeout (timeout=, or
 * VDISK_RBD_TIMEOUT, default 30 s): an unreachable cluster or a dead OSD
 * gives an error, never a hang. Waiting for the lock of a crashed owner is
 * bounded by lock_timeout= (default 45 s, the larger of that and timeout). */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

#include "vdisk/engine.h"
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "vdisk/loop.h"

#define RBD_PREFIX "rbd:"
#define RBD_DEFAULT_TIMEOUT 30
#define RBD_MAX_TIMEOUT 86400
#define RBD_LOCK_WAIT 45
/* Growth ahead of writes past the end: an eighth of the image, 64 MiB to
 * 1 GiB, in whole 4 MiB objects. */
#define RBD_GROW_MIN (64ULL << 20)
#define RBD_GROW_MAX (1ULL << 30)
#define RBD_GROW_ALIGN (4ULL << 20)
/* The most one librbd zeroing call is given (its length must fit an int). */
#define RBD_ZERO_CHUNK (1ULL << 30)
/* Block status is computed for this much of the image at a time. */
#define RBD_DIFF_WINDOW (1ULL << 30)

struct rbd_opt { char *key, *val; };

struct rbd_spec {
    char *pool, *ns, *image, *snap;
    char *conf, *id;
    unsigned timeout;               /* seconds */
    unsigned lock_timeout;          /* seconds; 0: the default */
    struct rbd_opt *opts;
    size_t nopts;
};

struct rbd_ext { uint64_t off, end; };

struct rbd_state {
    rados_t cluster;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    char *label;                    /* the name as given, for messages */
    char *cookie;                   /* our advisory lock, on images without exclusive-lock */
    unsigned timeout, lock_timeout;
    bool readonly;
    /* The size the image has for its users (as a file's size). Writes past
     * it grow the RBD image ahead in steps (psize), because a resize is a
     * cluster round trip and qcow2 appends cluster by cluster; close trims
     * the image back to size. Only we resize while we hold the lock. */
    _Atomic uint64_t size;
    uint64_t psize;                 /* the RBD image's size; under resize_lock */
    pthread_mutex_t resize_lock;
    /* Writes that need the image grown: one grows it on the worker pool,
     * the others wait here, so a burst of them holds one worker, not all. */
    pthread_mutex_t grow_lock;
    bool growing;
    struct vd_io *grow_head, **grow_tail;
    /* Bumped at the start and end of every change of content, so a block
     * status answer computed while a write was in flight is not reused. */
    _Atomic uint64_t wgen;
    /* The block status window: data extents in [ws, we), sorted, merged. */
    pthread_mutex_t ext_lock;
    bool ext_valid;
    uint64_t ext_gen, ws, we;
    struct rbd_ext *ext;
    size_t next, ext_cap;
};

/* ---- names ---- */

static bool rbd_match(const char *name)
{
    return strncmp(name, RBD_PREFIX, strlen(RBD_PREFIX)) == 0;
}

static void spec_free(struct rbd_spec *s)
{
    free(s->pool); free(s->ns); free(s->image); free(s->snap);
    free(s->conf); free(s->id);
    for (size_t i = 0; i < s->nopts; i++) { free(s->opts[i].key); free(s->opts[i].val); }
    free(s->opts);
    memset(s, 0, sizeof(*s));
}

/* Copy [p, end) without its escapes. */
static char *unescape(const char *p, const char *end)
{
    char *out = malloc((size_t)(end - p) + 1), *o = out;
    if (!out) return NULL;
    while (p < end) {
        if (*p == '\\' && p + 1 < end) p++;
        *o++ = *p++;
    }
    *o = '\0';
    return out;
}

/* The next unescaped occurrence of one of seps in [p, end), or end. */
static const char *find_sep(const char *p, const char *end, const char *seps)
{
    for (; p < end; p++) {
        if (*p == '\\') { if (p + 1 < end) p++; continue; }
        if (strchr(seps, *p)) return p;
    }
    return end;
}

static int parse_timeout(const char *v, unsigned *out, const char *what)
{
    char *e;
    errno = 0;
    unsigned long t = strtoul(v, &e, 10);
    if (errno || e == v || *e || t == 0 || t > RBD_MAX_TIMEOUT || v[0] == '-')
        return vd_err(-EINVAL, "%s: timeout must be a whole number of seconds from 1 to %d, not '%s'",
                      what, RBD_MAX_TIMEOUT, v);
    *out = (unsigned)t;
    return 0;
}

static int spec_parse(const char *name, struct rbd_spec *s)
{
    const char *p = name + strlen(RBD_PREFIX), *end = p + strlen(p);
    const char *img_end = find_sep(p, end, ":");
    const char *usage = "expected rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:timeout=SECONDS][:KEY=VALUE...]";
    memset(s, 0, sizeof(*s));
    s->timeout = RBD_DEFAULT_TIMEOUT;
    const char *env = getenv("VDISK_RBD_TIMEOUT");
    if (env && *env) {
        int r = parse_timeout(env, &s->timeout, "VDISK_RBD_TIMEOUT");
        if (r < 0) return r;
    }

    /* POOL/[NS/]IMAGE[@SNAP] */
    const char *at = find_sep(p, img_end, "@");
    const char *s1 = find_sep(p, at, "/");
    if (s1 == at) goto bad;
    const char *s2 = find_sep(s1 + 1, at, "/");
    s->pool = unescape(p, s1);
    if (s2 != at) {
        s->ns = unescape(s1 + 1, s2);
        s->image = unescape(s2 + 1, at);
        if (find_sep(s2 + 1, at, "/") != at) goto bad;
    } else {
        s->image = unescape(s1 + 1, at);
    }
    if (at != img_end) s->snap = unescape(at + 1, img_end);
    if (!s->pool || !s->image || (s2 != at && !s->ns) || (at != img_end && !s->snap)) {
        spec_free(s);
        return vd_err(-ENOMEM, "%s: out of memory", name);
    }
    if (!*s->pool || !*s->image || (s->ns && !*s->ns) || (s->snap && !*s->snap)) goto bad;

    /* :KEY=VALUE… */
    p = img_end;
    while (p < end) {
        p++;                                        /* the ':' */
        const char *oend = find_sep(p, end, ":");
        const char *eq = find_sep(p, oend, "=");
        if (eq == oend || eq == p) {
            char *o = unescape(p, oend);
            int r = vd_err(-EINVAL, "%s: option '%s' is not KEY=VALUE (%s)", name, o ? o : "", usage);
            free(o); spec_free(s);
            return r;
        }
        char *k = unescape(p, eq), *v = unescape(eq + 1, oend);
        if (!k || !v) { free(k); free(v); spec_free(s); return vd_err(-ENOMEM, "%s: out of memory", name); }
        if (!strcmp(k, "conf")) { free(s->conf); s->conf = v; free(k); }
        else if (!strcmp(k, "id")) { free(s->id); s->id = v; free(k); }
        else if (!strcmp(k, "timeout") || !strcmp(k, "lock_timeout")) {
            int r = parse_timeout(v, k[0] == 't' ? &s->timeout : &s->lock_timeout, name);
            free(k); free(v);
            if (r < 0) { spec_free(s); return r; }
        } else {
            struct rbd_opt *n = realloc(s->opts, (s->nopts + 1) * sizeof(*n));
            if (!n) { free(k); free(v); spec_free(s); return vd_err(-ENOMEM, "%s: out of memory", name); }
            s->opts = n;
            s->opts[s->nopts].key = k;
            s->opts[s->nopts].val = v;
            s->nopts++;
        }
        p = oend;
    }
    return 0;
bad:
    spec_free(s);
    return vd_err(-EINVAL, "%s: bad RBD image name (%s)", name, usage);
}

/* ---- connection ---- */

static int conf_set(struct rbd_state *st, const char *k, const char *v)
{
    int r = rados_conf_set(st->cluster, k, v);
    if (r < 0)
        return vd_err(r == -ENOENT ? -EINVAL : r, "%s: cannot set Ceph option %s=%s: %s", st->label, k, v,
                      r == -ENOENT ? "no such option" : strerror(-r));
    return 0;
}

static int rbd_connect(struct rbd_state *st, const struct rbd_spec *s, enum vd_cache cache)
{
    int r = rados_create(&st->cluster, s->id);
    if (r < 0) { st->cluster = NULL; return vd_err(r, "%s: cannot create a Ceph client: %s", st->label, strerror(-r)); }
    /* Library chatter would land on the user's terminal; errors are reported by us. */
    rados_conf_set(st->cluster, "log_to_stderr", "false");
    rados_conf_set(st->cluster, "err_to_stderr", "false");
    rados_conf_set(st->cluster, "log_file", "");
    if (s->conf) {
        r = rados_conf_read_file(st->cluster, s->conf);
        if (r < 0)
            return vd_err(r, "%s: cannot read Ceph configuration %s: %s", st->label, s->conf, strerror(-r));
    } else {
        /* the default search path (CEPH_CONF, /etc/ceph/ceph.conf…); none is fine
         * when mon_host is given as an option */
        rados_conf_read_file(st->cluster, NULL);
    }
    r = rados_conf_parse_env(st->cluster, NULL);
    if (r < 0) return vd_err(r, "%s: bad CEPH_ARGS: %s", st->label, strerror(-r));
    /* qemu's cache modes: writeback uses librbd's cache, none goes straight
     * to the OSDs. An explicit rbd_cache= option below still wins. */
    if ((r = conf_set(st, "rbd_cache", cache == VD_CACHE_NONE ? "false" : "true")) < 0) return r;
    /* Every image has a client of its own, so librados' completion pool
     * serves one image: one thread does, and completions then batch on it
     * instead of alternating between two threads that each must be woken
     * (+12-30 % 4 KiB IOPS on 2 CPUs, bench/RESULTS.md). Left alone when
     * the configuration sets another value; an explicit option wins. */
    char tc[16] = "";
    if (rados_conf_get(st->cluster, "librados_thread_count", tc, sizeof(tc)) == 0 && !strcmp(tc, "2") &&
        (r = conf_set(st, "librados_thread_count", "1")) < 0)
        return r;
    for (size_t i = 0; i < s->nopts; i++) {
        const char *k = s->opts[i].key;
        if (!strcmp(k, "auth_supported")) k = "auth_client_required";   /* qemu's old spelling */
        if ((r = conf_set(st, k, s->opts[i].val)) < 0) return r;
    }
    char t[16];
    snprintf(t, sizeof(t), "%u", s->timeout);
    if ((r = conf_set(st, "client_mount_timeout", t)) < 0 ||
        (r = conf_set(st, "rados_mon_op_timeout", t)) < 0 ||
        (r = conf_set(st, "rados_osd_op_timeout", t)) < 0)
        return r;

    r = rados_connect(st->cluster);
    if (r < 0) {
        char mon[256] = "";
        rados_conf_get(st->cluster, "mon_host", mon, sizeof(mon));
        if (r == -ETIMEDOUT || r == -EINTR)
            return vd_err(-ETIMEDOUT, "%s: cannot reach the Ceph cluster (mon_host '%s'%s%s) within %u s",
                          st->label, mon, s->conf ? ", from " : "", s->conf ? s->conf : "", s->timeout);
        if (r == -ENOENT && !*mon)
            return vd_err(-ENOENT, "%s: no Ceph monitors configured (give :conf=PATH or :mon_host=ADDR)", st->label);
        return vd_err(r, "%s: cannot connect to the Ceph cluster (mon_host '%s'): %s",
                      st->label, mon, strerror(-r));
    }
    r = rados_ioctx_create(st->cluster, s->pool, &st->ioctx);
    if (r < 0) {
        st->ioctx = NULL;
        if (r == -ENOENT) return vd_err(r, "%s: pool '%s' does not exist", st->label, s->pool);
        if (r == -ETIMEDOUT) return vd_err(r, "%s: pool '%s': no answer within %u s", st->label, s->pool, s->timeout);
        return vd_err(r, "%s: cannot open pool '%s': %s", st->label, s->pool, strerror(-r));
    }
    rados_ioctx_set_namespace(st->ioctx, s->ns ? s->ns : "");
    return 0;
}

static void state_free(struct rbd_state *st)
{
    if (!st) return;
    if (st->image && st->cookie) rbd_unlock(st->image, st->cookie);
    if (st->image) rbd_close(st->image);
    free(st->cookie);
    if (st->ioctx) rados_ioctx_destroy(st->ioctx);
    if (st->cluster) rados_shutdown(st->cluster);
    pthread_mutex_destroy(&st->resize_lock);
    pthread_mutex_destroy(&st->grow_lock);
    pthread_mutex_destroy(&st->ext_lock);
    free(st->ext);
    free(st->label);
    free(st);
}

static int open_error(struct rbd_state *st, const struct rbd_spec *s, int r)
{
    if (r == -ENOENT && s->snap)
        return vd_err(r, "%s: image '%s' or its snapshot '%s' does not exist in pool '%s'",
                      st->label, s->image, s->snap, s->pool);
    if (r == -ENOENT)
        return vd_err(r, "%s: image '%s' does not exist in pool '%s'%s%s", st->label, s->image,
                      s->pool, s->ns ? ", namespace " : "", s->ns ? s->ns : "");
    if (r == -ETIMEDOUT)
        return vd_err(r, "%s: no answer from the cluster within %u s (is an OSD down?)", st->label, s->timeout);
    return vd_err(r, "%s: cannot open the image: %s", st->label, strerror(-r));
}

/* rbd_lock_acquire runs on a thread of its own so that the wait is bounded
 * by our timeout: when the owner died without closing, librbd waits until
 * the cluster drops the dead client's watch (osd_client_watch_timeout, 30 s
 * by default) before it breaks the lock, whatever the op timeouts say. If
 * we stop waiting, the thread owns the state and frees it when librbd
 * returns. */
struct lock_wait {
    pthread_mutex_t m;
    pthread_cond_t c;
    bool done, abandoned;
    int r;
    struct rbd_state *st;
};

static void lock_wait_free(struct lock_wait *w)
{
    pthread_mutex_destroy(&w->m);
    pthread_cond_destroy(&w->c);
    free(w);
}

static void *lock_thread(void *arg)
{
    struct lock_wait *w = arg;
    int r = rbd_lock_acquire(w->st->image, RBD_LOCK_MODE_EXCLUSIVE);
    pthread_mutex_lock(&w->m);
    w->r = r;
    w->done = true;
    bool abandoned = w->abandoned;
    pthread_cond_signal(&w->c);
    pthread_mutex_unlock(&w->m);
    if (abandoned) {
        state_free(w->st);     /* closing releases the lock if we got it late */
        lock_wait_free(w);
    }
    return NULL;
}

/* 0, or -errno; *gave_up when the lock thread now owns st. */
static int acquire_bounded(struct rbd_state *st, bool *gave_up)
{
    struct lock_wait *w = calloc(1, sizeof(*w));
    if (!w) return -ENOMEM;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&w->m, NULL);
    pthread_cond_init(&w->c, &ca);
    pthread_condattr_destroy(&ca);
    w->st = st;
    pthread_t t;
    pthread_attr_t ta;
    pthread_attr_init(&ta);
    pthread_attr_setdetachstate(&ta, PTHREAD_CREATE_DETACHED);
    int r = -pthread_create(&t, &ta, lock_thread, w);
    pthread_attr_destroy(&ta);
    if (r < 0) { lock_wait_free(w); return r; }
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += st->lock_timeout;
    pthread_mutex_lock(&w->m);
    while (!w->done && pthread_cond_timedwait(&w->c, &w->m, &dl) != ETIMEDOUT) {}
    if (w->done) {
        r = w->r;
        pthread_mutex_unlock(&w->m);
        lock_wait_free(w);
        return r;
    }
    w->abandoned = true;
    *gave_up = true;
    pthread_mutex_unlock(&w->m);
    return -ETIMEDOUT;
}

static void lock_owner(struct rbd_state *st, char *who, size_t len)
{
    char *owners[4];
    size_t n = 4;
    rbd_lock_mode_t mode;
    snprintf(who, len, "another client");
    if (rbd_lock_get_owners(st->image, &mode, owners, &n) == 0 && n > 0) {
        snprintf(who, len, "%s", owners[0]);
        rbd_lock_get_owners_cleanup(owners, n);
    }
}

/* Images without the exclusive-lock feature (e.g. made for old kernel
 * clients): RBD's advisory lock keeps a second vdisk writer out. It is not
 * broken when its owner dies: the message says how to remove it. */
static int take_advisory_lock(struct rbd_state *st)
{
    char host[64] = "host", cookie[160];
    gethostname(host, sizeof(host) - 1);
    snprintf(cookie, sizeof(cookie), "vdisk %s %ld %lx", host, (long)getpid(), (unsigned long)(uintptr_t)st);
    int r = rbd_lock_exclusive(st->image, cookie);
    if (r == 0) {
        st->cookie = strdup(cookie);
        if (!st->cookie) { rbd_unlock(st->image, cookie); return vd_err(-ENOMEM, "%s: out of memory", st->label); }
        return 0;
    }
    if (r != -EBUSY && r != -EEXIST)
        return vd_err(r, "%s: cannot take the advisory lock: %s", st->label, strerror(-r));
    int excl = 0;
    char tag[128], clients[256], cookies[256], addrs[256];
    size_t tl = sizeof(tag), cl = sizeof(clients), kl = sizeof(cookies), al = sizeof(addrs);
    if (rbd_list_lockers(st->image, &excl, tag, &tl, clients, &cl, cookies, &kl, addrs, &al) > 0)
        return vd_err(-EBUSY, "%s: the image is open for writing elsewhere (advisory lock '%s' held by %s at %s; "
                      "if that host is gone: rbd lock rm POOL/IMAGE '%s' %s)",
                      st->label, cookies, clients, addrs, cookies, clients);
    return vd_err(-EBUSY, "%s: the image is locked by another client (rbd lock ls POOL/IMAGE)", st->label);
}

/* Take RBD's exclusive lock and keep it until close: librbd then refuses
 * other clients' requests to hand it over, so a second writer fails.
 * *gave_up: st now belongs to the lock thread (see acquire_bounded). */
static int take_lock(struct rbd_state *st, bool *gave_up)
{
    uint64_t features = 0;
    char who[256];
    int r = rbd_get_features(st->image, &features);
    if (r < 0) return vd_err(r, "%s: cannot read the image's features: %s", st->label, strerror(-r));
    if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK))
        return take_advisory_lock(st);
    lock_owner(st, who, sizeof(who));   /* before: a lock thread we give up on closes the image */
    r = acquire_bounded(st, gave_up);
    if (r == 0) return 0;
    if (*gave_up)
        return vd_err(-ETIMEDOUT, "%s: the exclusive lock is held by %s, which did not answer within %u s "
                      "(its host may have died: the cluster breaks a dead owner's lock once it drops that "
                      "client's watch, osd_client_watch_timeout, 30 s by default; retry then, or wait "
                      "longer with :lock_timeout=SECONDS)",
                      st->label, who, st->lock_timeout);
    lock_owner(st, who, sizeof(who));
    if (r == -EROFS || r == -EBUSY || r == -EAGAIN)
        return vd_err(-EBUSY, "%s: the image is open for writing elsewhere (exclusive lock held by %s)",
                      st->label, who);
    if (r == -ETIMEDOUT)
        return vd_err(r, "%s: the exclusive lock (held by %s) was not handed over within %u s",
                      st->label, who, st->timeout);
    return vd_err(r, "%s: cannot take the exclusive lock: %s", st->label, strerror(-r));
}

static int rbd_open_(struct vd_file *f, const char *name, int flags, enum vd_cache cache)
{
    struct rbd_spec s;
    bool created = false;
    int r = spec_parse(name, &s);
    if (r < 0) return r;
    struct rbd_state *st = calloc(1, sizeof(*st));
    if (!st) { spec_free(&s); return vd_err(-ENOMEM, "%s: out of memory", name); }
    pthread_mutex_init(&st->resize_lock, NULL);
    pthread_mutex_init(&st->grow_lock, NULL);
    st->grow_tail = &st->grow_head;
    pthread_mutex_init(&st->ext_lock, NULL);
    st->timeout = s.timeout;
    /* A crashed owner's lock is broken only once the cluster drops its
     * watch (30 s by default): wait a little longer than that unless told. */
    st->lock_timeout = s.lock_timeout ? s.lock_timeout : (s.timeout > RBD_LOCK_WAIT ? s.timeout : RBD_LOCK_WAIT);
    st->readonly = (flags & VD_FILE_RDONLY) || s.snap;
    st->label = strdup(name);     /* messages name the image as the user gave it */
    if (!st->label) { r = vd_err(-ENOMEM, "%s: out of memory", name); goto fail; }
    if (s.snap && !(flags & VD_FILE_RDONLY) && !(flags & VD_FILE_CREATE)) {
        r = vd_err(-EROFS, "%s: snapshot '%s' is read-only: open it read-only", name, s.snap);
        goto fail;
    }
    if ((flags & VD_FILE_CREATE) && (s.snap || (flags & VD_FILE_RDONLY))) {
        r = vd_err(-EINVAL, "%s: cannot create %s", st->label, s.snap ? "a snapshot" : "a read-only image");
        goto fail;
    }
    if ((r = rbd_connect(st, &s, cache)) < 0) goto fail;

    if (flags & VD_FILE_CREATE) {
        /* Created empty: the format sets the size through truncate. An
         * existing image is never truncated (VD_FILE_TRUNC notwithstanding,
         * as qemu-img does for rbd): a cluster's images are other hosts'
         * disks, and a typo must not wipe one. */
        int order = 0;
        r = rbd_create(st->ioctx, s.image, 0, &order);
        if (r == -EEXIST) {
            r = vd_err(r, "%s: the image already exists (remove it first with `rbd rm %s/%s%s%s`)",
                       st->label, s.pool, s.ns ? s.ns : "", s.ns ? "/" : "", s.image);
            goto fail;
        }
        if (r < 0) { r = vd_err(r, "%s: cannot create the image: %s", st->label, strerror(-r)); goto fail; }
        created = true;
    }
    if (st->readonly)
        r = rbd_open_read_only(st->ioctx, s.image, &st->image, s.snap);
    else
        r = rbd_open(st->ioctx, s.image, &st->image, NULL);
    if (r < 0) { st->image = NULL; r = open_error(st, &s, r); goto fail; }
    if (!st->readonly && !(flags & VD_FILE_NOLOCK)) {
        bool gave_up = false;
        if ((r = take_lock(st, &gave_up)) < 0) {
            if (gave_up) st = NULL;     /* the lock thread frees it */
            goto fail;
        }
    }
    uint64_t size;
    r = rbd_get_size(st->image, &size);
    if (r < 0) { r = vd_err(r, "%s: cannot read the image size: %s", st->label, strerror(-r)); goto fail; }
    atomic_store(&st->size, size);
    st->psize = size;

    spec_free(&s);
    f->priv = st;
    f->fd = -1;
    f->readonly = st->readonly;
    f->direct = false;
    f->align = 1;
    return 0;
fail:
    if (created && st) {            /* leave no half-made image behind */
        if (st->image) { rbd_close(st->image); st->image = NULL; }
        rbd_remove(st->ioctx, s.image);
    }
    spec_free(&s);
    state_free(st);
    return r;
}

static void rbd_close_(struct vd_file *f)
{
    struct rbd_state *st = f->priv;
    if (!st) return;
    /* Give back what was grown ahead of the writes (a crash leaves it: it
     * reads as zeros past the old end). */
    uint64_t size = atomic_load(&st->size);
    if (!st->readonly && st->psize > size) rbd_resize(st->image, size);
    /* rbd_close flushes librbd's cache and releases the exclusive lock. */
    state_free(st);
    f->priv = NULL;
}

/* ---- helpers ---- */

static void bump(struct rbd_state *st) { atomic_fetch_add(&st->wgen, 1); }

/* Grow the image so that [0, end) exists: writes past the end extend a
 * file, and formats such as qcow2 rely on that. */
static int grow_to(struct rbd_state *st, uint64_t end)
{
    int r = 0;
    if (end <= atomic_load(&st->size)) return 0;
    pthread_mutex_lock(&st->resize_lock);
    if (end > st->psize) {
        uint64_t step = st->psize / 8;
        step = step < RBD_GROW_MIN ? RBD_GROW_MIN : step > RBD_GROW_MAX ? RBD_GROW_MAX : step;
        uint64_t want = end > st->psize + step ? end : st->psize + step;
        want = (want + RBD_GROW_ALIGN - 1) / RBD_GROW_ALIGN * RBD_GROW_ALIGN;
        if (rbd_resize(st->image, want) == 0) st->psize = want;
        else if ((r = rbd_resize(st->image, end)) == 0) st->psize = end;
        else r = vd_err(r, "%s: cannot grow the image to %" PRIu64 " bytes: %s", st->label, end, strerror(-r));
    }
    if (r == 0 && end > atomic_load(&st->size)) { atomic_store(&st->size, end); bump(st); }
    pthread_mutex_unlock(&st->resize_lock);
    return r;
}

static int io_error(struct rbd_state *st, const char *what, uint64_t off, uint64_t len, int r)
{
    if (r == -ETIMEDOUT)
        return vd_err(r, "%s: %s of %" PRIu64 " bytes at offset %" PRIu64 ": no answer from the cluster within %u s",
                      st->label, what, len, off, st->timeout);
    if (r == -ESHUTDOWN)
        return vd_err(r, "%s: %s at offset %" PRIu64 ": this client lost the image to another (blocklisted)",
                      st->label, what, off);
    return vd_err(r, "%s: %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s", st->label, what, len, off, strerror(-r));
}

static int check_rw(struct rbd_state *st)
{
    return st->readonly ? vd_err(-EROFS, "%s: opened read-only", st->label) : 0;
}

/* ---- synchronous calls ---- */

static int rbd_pread_(struct vd_file *f, void *buf, size_t len, uint64_t off)
{
    struct rbd_state *st = f->priv;
    uint64_t size = atomic_load(&st->size);
    size_t n = off >= size ? 0 : (size_t)(len < size - off ? len : size - off);
    size_t done = 0;
    while (done < n) {
        size_t chunk = n - done > (1u << 30) ? (1u << 30) : n - done;
        ssize_t r = rbd_read(st->image, off + done, chunk, (char *)buf + done);
        if (r < 0) return io_error(st, "read", off + done, chunk, (int)r);
        if (r == 0) break;              /* shrunk under us: the rest reads as zeros */
        done += (size_t)r;
    }
    memset((char *)buf + done, 0, len - done);
    return 0;
}

static int rbd_pwrite_(struct vd_file *f, const void *buf, size_t len, uint64_t off)
{
    struct rbd_state *st = f->priv;
    int r = check_rw(st);
    if (r < 0 || len == 0) return r;
    if ((r = grow_to(st, off + len)) < 0) return r;
    bump(st);
    size_t done = 0;
    while (done < len) {
        size_t chunk = len - done > (1u << 30) ? (1u << 30) : len - done;
        ssize_t w = rbd_write(st->image, off + done, chunk, (const char *)buf + done);
        if (w < 0) { bump(st); return io_error(st, "write", off + done, chunk, (int)w); }
        if (w == 0) { bump(st); return io_error(st, "write", off + done, chunk, -EIO); }
        done += (size_t)w;
    }
    bump(st);
    return 0;
}

static int rbd_sync_(struct vd_file *f)
{
    struct rbd_state *st = f->priv;
    if (st->readonly) return 0;
    int r = rbd_flush(st->image);
    return r < 0 ? vd_err(r, "%s: flush: %s", st->label, r == -ETIMEDOUT ? "no answer from the cluster" : strerror(-r)) : 0;
}

static int rbd_size_(struct vd_file *f, uint64_t *size)
{
    struct rbd_state *st = f->priv;
    if (!st->readonly) {            /* we hold the lock: nobody else resizes */
        *size = atomic_load(&st->size);
        return 0;
    }
    uint64_t s;
    int r = rbd_get_size(st->image, &s);
    if (r < 0) return vd_err(r, "%s: cannot read the size: %s", st->label, strerror(-r));
    atomic_store(&st->size, s);
    *size = s;
    return 0;
}

static int rbd_truncate_(struct vd_file *f, uint64_t size)
{
    struct rbd_state *st = f->priv;
    int r = check_rw(st);
    if (r < 0) return r;
    pthread_mutex_lock(&st->resize_lock);
    bump(st);
    r = rbd_resize(st->image, size);
    if (r < 0) r = vd_err(r, "%s: cannot resize to %" PRIu64 " bytes: %s", st->label, size, strerror(-r));
    else { atomic_store(&st->size, size); st->psize = size; }
    bump(st);
    pthread_mutex_unlock(&st->resize_lock);
    return r;
}

/* Zero [off, off+len) within the image; thick keeps the space allocated. */
static int zero_range(struct vd_file *f, uint64_t off, uint64_t len, bool thick, const char *what)
{
    struct rbd_state *st = f->priv;
    int r = check_rw(st);
    if (r < 0) return r;
    uint64_t size = atomic_load(&st->size);
    if (off >= size || len == 0) return 0;
    if (len > size - off) len = size - off;
    bump(st);
    while (len) {
        /* write_zeroes without THICK_PROVISION discards, zeroing partial
         * objects (unlike rbd_discard, which may skip them). */
        size_t chunk = len > RBD_ZERO_CHUNK ? RBD_ZERO_CHUNK : (size_t)len;
        ssize_t w = rbd_write_zeroes(st->image, off, chunk, thick ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0, 0);
        if (w < 0) { r = io_error(st, what, off, chunk, (int)w); break; }
        off += chunk; len -= chunk;
    }
    bump(st);
    return r;
}

static int rbd_punch_(struct vd_file *f, uint64_t off, uint64_t len)
{
    return zero_range(f, off, len, false, "discard");
}

static int rbd_zero_(struct vd_file *f, uint64_t off, uint64_t len)
{
    return zero_range(f, off, len, true, "write zeroes");
}

/* RBD has no reservation: thin images read zeros where nothing was written.
 * Only make sure the range exists, as fallocate would extend a file. */
static int rbd_allocate_(struct vd_file *f, uint64_t off, uint64_t len)
{
    struct rbd_state *st = f->priv;
    int r = check_rw(st);
    return r < 0 ? r : grow_to(st, off + len);
}

/* ---- block status ---- */

struct diff_ctx {
    struct rbd_ext *ext;
    size_t n, cap;
    int err;
};

static int diff_cb(uint64_t off, size_t len, int exists, void *arg)
{
    struct diff_ctx *c = arg;
    if (!exists || !len) return 0;
    if (c->n && c->ext[c->n - 1].end == off) { c->ext[c->n - 1].end = off + len; return 0; }
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        struct rbd_ext *e = realloc(c->ext, cap * sizeof(*e));
        if (!e) { c->err = -ENOMEM; return -ENOMEM; }
        c->ext = e; c->cap = cap;
    }
    c->ext[c->n].off = off;
    c->ext[c->n].end = off + len;
    c->n++;
    return 0;
}

static int ext_cmp(const void *a, const void *b)
{
    const struct rbd_ext *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static void ext_normalise(struct diff_ctx *c)
{
    if (c->n < 2) return;
    qsort(c->ext, c->n, sizeof(*c->ext), ext_cmp);
    size_t w = 0;
    for (size_t i = 1; i < c->n; i++) {
        if (c->ext[i].off <= c->ext[w].end) {
            if (c->ext[i].end > c->ext[w].end) c->ext[w].end = c->ext[i].end;
        } else {
            c->ext[++w] = c->ext[i];
        }
    }
    c->n = w + 1;
}

/* Data extents of [ws, we): first which objects exist (whole objects, from
 * the object map when fast-diff is on, so an empty region costs nothing),
 * then the exact extents inside those objects. */
static int diff_window(struct rbd_state *st, uint64_t ws, uint64_t we, struct diff_ctx *out)
{
    struct diff_ctx objs = {0};
    int r = rbd_diff_iterate2(st->image, NULL, ws, we - ws, 1, 1, diff_cb, &objs);
    if (r < 0 || objs.err) { free(objs.ext); return objs.err ? objs.err : r; }
    ext_normalise(&objs);
    for (size_t i = 0; i < objs.n && r >= 0; i++) {
        uint64_t a = objs.ext[i].off < ws ? ws : objs.ext[i].off;
        uint64_t b = objs.ext[i].end > we ? we : objs.ext[i].end;
        if (a < b) r = rbd_diff_iterate2(st->image, NULL, a, b - a, 1, 0, diff_cb, out);
        if (out->err) r = out->err;
    }
    free(objs.ext);
    if (r < 0) return r;
    ext_normalise(out);
    return 0;
}

static int rbd_extent_(struct vd_file *f, uint64_t off, bool *is_data, uint64_t *end)
{
    struct rbd_state *st = f->priv;
    uint64_t size = atomic_load(&st->size);
    if (off >= size) return vd_err(-ENXIO, "%s: block status at offset %" PRIu64 " past the end (%" PRIu64 ")",
                                   st->label, off, size);
    int r = 0;
    pthread_mutex_lock(&st->ext_lock);
    uint64_t gen = atomic_load(&st->wgen);
    if (!st->ext_valid || st->ext_gen != gen || off < st->ws || off >= st->we) {
        uint64_t ws = off, we = size - off > RBD_DIFF_WINDOW ? off + RBD_DIFF_WINDOW : size;
        struct diff_ctx c = {0};
        r = diff_window(st, ws, we, &c);
        if (r < 0) {
            free(c.ext);
            st->ext_valid = false;
            pthread_mutex_unlock(&st->ext_lock);
            return io_error(st, "block status", ws, we - ws, r);
        }
        free(st->ext);
        st->ext = c.ext; st->next = c.n; st->ext_cap = c.cap;
        st->ws = ws; st->we = we; st->ext_gen = gen; st->ext_valid = true;
    }
    /* the first extent ending after off */
    size_t lo = 0, hi = st->next;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (st->ext[mid].end <= off) lo = mid + 1; else hi = mid;
    }
    if (lo < st->next && st->ext[lo].off <= off) {
        *is_data = true;
        *end = st->ext[lo].end < st->we ? st->ext[lo].end : st->we;
    } else {
        *is_data = false;
        *end = lo < st->next ? st->ext[lo].off : st->we;
    }
    pthread_mutex_unlock(&st->ext_lock);
    return 0;
}

struct alloc_ctx { uint64_t bytes; };

static int alloc_cb(uint64_t off, size_t len, int exists, void *arg)
{
    struct alloc_ctx *c = arg;
    if (exists) c->bytes += len;
    return 0;
}

/* Bytes in objects that exist (object-granular, like `rbd du`). */
static uint64_t rbd_allocated_bytes_(struct vd_file *f)
{
    struct rbd_state *st = f->priv;
    struct alloc_ctx c = {0};
    uint64_t size = atomic_load(&st->size);
    if (!size || rbd_diff_iterate2(st->image, NULL, 0, size, 1, 1, alloc_cb, &c) < 0) return 0;
    return c.bytes;
}

/* ---- asynchronous I/O ---- */

static uint64_t iov_len(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++) t += iov[i].iov_len;
    return t;
}

static void iov_zero_from(struct iovec *iov, int n, uint64_t from)
{
    for (int i = 0; i < n; i++) {
        if (from >= iov[i].iov_len) { from -= iov[i].iov_len; continue; }
        memset((char *)iov[i].iov_base + from, 0, iov[i].iov_len - from);
        from = 0;
    }
}

static bool zeroing(const struct vd_io *io) { return io->op == VD_IO_PUNCH || io->op == VD_IO_ZERO; }

static uint64_t io_len(const struct vd_io *io)
{
    return zeroing(io) ? io->len : io->op == VD_IO_SYNC ? 0 : iov_len(io->iov, io->iovcnt);
}

static const char *op_name(const struct vd_io *io)
{
    switch (io->op) {
    case VD_IO_READ:  return "read";
    case VD_IO_WRITE: return "write";
    case VD_IO_PUNCH: return "discard";
    case VD_IO_ZERO:  return "write zeroes";
    default:          return "flush";
    }
}

/* On the io's loop: finish it. io->xfer holds librbd's return value. */
static void aio_finish(void *opaque)
{
    struct vd_io *io = opaque;
    struct rbd_state *st = io->file->priv;
    int64_t r = (int64_t)io->xfer;
    uint64_t len = io_len(io);
    if (io->op == VD_IO_WRITE || zeroing(io)) bump(st);
    if (r >= 0) {
        if (io->op == VD_IO_READ && (uint64_t)r < len) iov_zero_from(io->iov, io->iovcnt, (uint64_t)r);
        io->xfer = len;
        io->done(io, 0);
        return;
    }
    io->xfer = 0;
    io_error(st, op_name(io), io->off, len, (int)r);
    io->done(io, (int)r);
}

/* One librbd call in flight for an io. Allocated and freed on the io's
 * loop; librbd's completion thread only fills in ret and pushes the node
 * (no lock, no allocation there, and one wake-up of the loop per batch of
 * completions at most). */
struct rbd_aio {
    struct vd_post_node node;
    struct vd_io *io;
};

static void aio_done(void *opaque)
{
    struct rbd_aio *a = opaque;
    struct vd_io *io = a->io;
    free(a);
    aio_finish(io);
}

/* On a librbd thread: no vdisk state is touched here. */
static void aio_cb(rbd_completion_t c, void *arg)
{
    struct rbd_aio *a = arg;
    ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    a->io->xfer = (uint64_t)(int64_t)r;
    vd_loop_post_node(a->io->loop, &a->node);
}

/* A completion for io, to pass to one librbd aio call (NULL: out of memory). */
static struct rbd_aio *aio_new(struct vd_io *io, rbd_completion_t *c)
{
    struct rbd_aio *a = malloc(sizeof(*a));
    if (!a) return NULL;
    a->node.fn = aio_done;
    a->node.opaque = a;
    a->io = io;
    if (rbd_aio_create_completion(a, aio_cb, c) < 0) { free(a); return NULL; }
    return a;
}

static void aio_fail(struct vd_io *io, int r)
{
    io->xfer = (uint64_t)(int64_t)r;
    vd_loop_post(io->loop, aio_finish, io);
}

/* A zeroing larger than one librbd call takes: its parts in flight at once;
 * the last to finish finishes the io with the first error. */
struct zero_parts {
    struct vd_io *io;
    atomic_int left;
    _Atomic int64_t err;
};

static void zero_parts_put(struct zero_parts *z)
{
    if (atomic_fetch_sub(&z->left, 1) != 1) return;
    z->io->xfer = (uint64_t)atomic_load(&z->err);
    vd_loop_post(z->io->loop, aio_finish, z->io);
    free(z);
}

static void zero_part_cb(rbd_completion_t c, void *arg)
{
    struct zero_parts *z = arg;
    int64_t r = rbd_aio_get_return_value(c), ok = 0;
    rbd_aio_release(c);
    if (r < 0) atomic_compare_exchange_strong(&z->err, &ok, r);
    zero_parts_put(z);
}

/* Discard (punch) or write zeroes asynchronously. librbd's write_zeroes
 * without THICK_PROVISION deallocates whole objects and zeroes partial
 * ones (rbd_aio_discard may leave partial objects as they were, with
 * rbd_skip_partial_discard), so both go through it. */
static void submit_zero(struct rbd_state *st, struct vd_io *io)
{
    int flags = io->op == VD_IO_ZERO ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0;
    uint64_t size = atomic_load(&st->size), off = io->off, len = io->len;
    rbd_completion_t c;
    int r;
    if (st->readonly) { aio_fail(io, -EROFS); return; }
    if (off >= size || len == 0) { io->xfer = 0; vd_loop_post(io->loop, aio_finish, io); return; }
    if (len > size - off) len = size - off;
    bump(st);
    if (len <= RBD_ZERO_CHUNK) {
        struct rbd_aio *a = aio_new(io, &c);
        if (!a) { aio_fail(io, -ENOMEM); return; }
        if ((r = rbd_aio_write_zeroes(st->image, off, (size_t)len, c, flags, 0)) < 0) {
            rbd_aio_release(c);
            free(a);
            aio_fail(io, r);
        }
        return;
    }
    struct zero_parts *z = calloc(1, sizeof(*z));
    if (!z) { aio_fail(io, -ENOMEM); return; }
    z->io = io;
    atomic_init(&z->left, 1);           /* ours, until every part is in flight */
    atomic_init(&z->err, 0);
    while (len) {
        uint64_t n = len < RBD_ZERO_CHUNK ? len : RBD_ZERO_CHUNK;
        r = rbd_aio_create_completion(z, zero_part_cb, &c);
        if (r == 0) {
            atomic_fetch_add(&z->left, 1);
            r = rbd_aio_write_zeroes(st->image, off, (size_t)n, c, flags, 0);
            if (r < 0) { rbd_aio_release(c); atomic_fetch_sub(&z->left, 1); }
        }
        if (r < 0) {
            int64_t ok = 0;
            atomic_compare_exchange_strong(&z->err, &ok, (int64_t)r);
            break;
        }
        off += n; len -= n;
    }
    zero_parts_put(z);
}

/* A write past the end within what was grown ahead only moves the size;
 * false when the image itself must grow (or a resize is under way). */
static bool grow_in_place(struct rbd_state *st, uint64_t end)
{
    if (end <= atomic_load(&st->size)) return true;
    if (pthread_mutex_trylock(&st->resize_lock) != 0) return false;
    bool done = end <= st->psize;
    if (done && end > atomic_load(&st->size)) { atomic_store(&st->size, end); bump(st); }
    pthread_mutex_unlock(&st->resize_lock);
    return done;
}

static void submit_aio(struct rbd_state *st, struct vd_io *io, uint64_t len);

/* A write that needs rbd_resize first: that is a cluster round trip (or
 * the RBD timeout with a dead OSD), so it runs on the worker pool and the
 * write is submitted from its loop afterwards. Once per growth step;
 * writes that come meanwhile wait for it (grow_head), then try again on
 * their own loops. */
struct grow_job {
    struct vd_io *io;
    uint64_t len;
    int r;
    char msg[256];
};

static void grow_run(void *opaque)
{
    struct grow_job *g = opaque;
    struct rbd_state *st = g->io->file->priv;
    vd_err_clear();
    g->r = grow_to(st, g->io->off + g->len);
    if (g->r < 0) snprintf(g->msg, sizeof(g->msg), "%s", vd_errmsg(g->r));
}

static void rbd_submit_(struct vd_file *f, struct vd_io *io);

static void grow_retry(void *opaque)
{
    struct vd_io *io = opaque;
    rbd_submit_(io->file, io);
}

/* The grow is over: the writes that waited try again, or fail as it did
 * (a sick cluster costs one timeout, not one per waiting write). */
static void grow_release(struct rbd_state *st, int r)
{
    pthread_mutex_lock(&st->grow_lock);
    struct vd_io *w = st->grow_head;
    st->grow_head = NULL;
    st->grow_tail = &st->grow_head;
    st->growing = false;
    pthread_mutex_unlock(&st->grow_lock);
    while (w) {
        struct vd_io *next = w->next;
        w->next = NULL;
        if (r < 0) aio_fail(w, r);
        else vd_loop_post(w->loop, grow_retry, w);
        w = next;
    }
}

static void grow_done(void *opaque)
{
    struct grow_job *g = opaque;
    struct vd_io *io = g->io;
    struct rbd_state *st = io->file->priv;
    uint64_t len = g->len;
    int r = g->r;
    if (r < 0) vd_err(r, "%s", g->msg);
    free(g);
    grow_release(st, r);
    if (r < 0) { aio_fail(io, r); return; }
    bump(st);
    submit_aio(st, io, len);
}

static void rbd_submit_(struct vd_file *f, struct vd_io *io)
{
    struct rbd_state *st = f->priv;
    uint64_t len = io->op == VD_IO_SYNC ? 0 : iov_len(io->iov, io->iovcnt);

    if (zeroing(io)) { submit_zero(st, io); return; }
    if (io->op == VD_IO_WRITE) {
        if (st->readonly) { aio_fail(io, -EROFS); return; }
        if (len && !grow_in_place(st, io->off + len)) {
            pthread_mutex_lock(&st->grow_lock);
            bool wait = st->growing;
            if (wait) {
                io->next = NULL;
                *st->grow_tail = io;
                st->grow_tail = &io->next;
            }
            st->growing = true;
            pthread_mutex_unlock(&st->grow_lock);
            if (wait) return;
            struct grow_job *g = calloc(1, sizeof(*g));
            if (!g) { grow_release(st, -ENOMEM); aio_fail(io, -ENOMEM); return; }
            g->io = io;
            g->len = len;
            vd_loop_offload(io->loop, grow_run, grow_done, g);
            return;
        }
        bump(st);
    }
    submit_aio(st, io, len);
}

static void submit_aio(struct rbd_state *st, struct vd_io *io, uint64_t len)
{
    rbd_completion_t c;
    int r;
    if (io->op == VD_IO_READ && io->off >= atomic_load(&st->size)) {
        io->xfer = 0;   /* all past the end: zeros, finished by aio_finish */
        vd_loop_post(io->loop, aio_finish, io);
        return;
    }
    if (io->op == VD_IO_SYNC && st->readonly) { io->xfer = 0; vd_loop_post(io->loop, aio_finish, io); return; }
    if (io->iovcnt > IOV_MAX) { aio_fail(io, -EINVAL); return; }
    struct rbd_aio *a = aio_new(io, &c);
    if (!a) { aio_fail(io, -ENOMEM); return; }
    switch (io->op) {
    case VD_IO_READ:  r = rbd_aio_readv(st->image, io->iov, io->iovcnt, io->off, c); break;
    case VD_IO_WRITE: r = rbd_aio_writev(st->image, io->iov, io->iovcnt, io->off, c); break;
    case VD_IO_SYNC:  r = rbd_aio_flush(st->image, c); break;
    default:          r = -EINVAL; break;
    }
    if (r < 0) { rbd_aio_release(c); free(a); aio_fail(io, r); }
}

static const struct vd_proto rbd_proto = {
    .name = "rbd",
    .match = rbd_match,
    .open = rbd_open_,
    .close = rbd_close_,
    .pread = rbd_pread_,
    .pwrite = rbd_pwrite_,
    .sync = rbd_sync_,
    .size = rbd_size_,
    .truncate = rbd_truncate_,
    .allocate = rbd_allocate_,
    .punch = rbd_punch_,
    .zero = rbd_zero_,
    .extent = rbd_extent_,
    .allocated_bytes = rbd_allocated_bytes_,
    .submit = rbd_submit_,
    .submit_zero = true,
};

__attribute__((constructor)) static void rbd_register(void)
{
    vd_proto_register(&rbd_proto);
}
