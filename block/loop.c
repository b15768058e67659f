/* The per-thread event loop: epoll over fd watchers (level-triggered), a
 * posted-work queue woken by an eventfd, one-shot timers kept in a sorted
 * list (the epoll timeout is the next deadline), and the thread's I/O
 * engine, whose completion eventfd is one more watcher. Loops may nest: a
 * synchronous call made from a callback runs the same loop again, so all
 * dispatch state lives on the stack and freed watchers are reclaimed only
 * when the outermost dispatch ends. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "vdisk/loop.h"
#include "vdisk/error.h"
#include "block/engine_int.h"

#define ENGINE_DEPTH 128

struct watcher {
    int fd;
    uint32_t events;
    vd_fd_cb cb;
    void *opaque;
    bool dead;
    struct watcher *next_dead;
};

struct posted {
    vd_fn fn;
    void *opaque;
    struct posted *next;
};

struct timer {
    uint64_t id;
    uint64_t deadline;      /* CLOCK_MONOTONIC ns */
    vd_fn fn;
    void *opaque;
    struct timer *prev, *next;
};

struct vd_loop {
    int epfd;
    int post_fd;            /* eventfd: posted work or stop */
    const struct vd_engine_ops *eops;
    struct vd_engine *engine;
    int engine_fd;

    struct watcher **w;     /* indexed by fd */
    int nw;
    struct watcher *dead;   /* freed once no dispatch is running */
    int depth;              /* nesting of run_once */

    pthread_mutex_t post_lock;
    struct posted *post_head, *post_tail;
    /* vd_loop_post_node: a lock-free stack (newest first), and whether the
     * loop is in (or about to enter) a blocking epoll_wait. */
    _Atomic(struct vd_post_node *) nodes;
    atomic_bool sleeping;

    struct timer *timers;   /* sorted by deadline */
    uint64_t next_timer_id;

    /* Polling (see poll_wait): the current window and its bound, in ns. */
    uint64_t poll_ns, poll_max_ns;
    bool events_recent;     /* the last wait returned fd events */
    /* Whether the loop's thread shares its CPU (see cpu_shared). */
    uint64_t shared_until;
    int sched_fd;           /* /proc/thread-self/schedstat of sched_tid */
    pid_t sched_tid;
    uint64_t sched_at, sched_wait;

    /* Inline reads (see run_inline): reads of page-cached files waiting for
     * the next flush point, and the back-off after reads that missed. */
    bool inline_reads;
    struct vd_io *il_head, *il_tail;
    unsigned il_skip, il_backoff;

    atomic_bool stop;
    atomic_int offloads;    /* offloaded jobs whose done has not run yet */
    bool lazy;              /* made by vd_loop_current(): freed at thread exit */
};

static uint64_t poll_default(void);

static __thread struct vd_loop *cur_loop;
static pthread_key_t lazy_key;
static pthread_once_t lazy_once = PTHREAD_ONCE_INIT;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- fd watchers ---- */

static int grow_watchers(struct vd_loop *l, int fd)
{
    if (fd < l->nw)
        return 0;
    int n = l->nw ? l->nw : 64;
    while (n <= fd)
        n *= 2;
    struct watcher **w = realloc(l->w, (size_t)n * sizeof(*w));
    if (!w)
        return -ENOMEM;
    memset(w + l->nw, 0, (size_t)(n - l->nw) * sizeof(*w));
    l->w = w;
    l->nw = n;
    return 0;
}

int vd_loop_add_fd(struct vd_loop *l, int fd, uint32_t events, vd_fd_cb cb, void *opaque)
{
    if (fd < 0 || !cb)
        return -EINVAL;
    int r = grow_watchers(l, fd);
    if (r < 0)
        return r;
    if (l->w[fd])
        return -EEXIST;
    struct watcher *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    *w = (struct watcher){ .fd = fd, .events = events, .cb = cb, .opaque = opaque };
    struct epoll_event ev = { .events = events, .data.ptr = w };
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        r = -errno;
        free(w);
        return r;
    }
    l->w[fd] = w;
    return 0;
}

int vd_loop_mod_fd(struct vd_loop *l, int fd, uint32_t events)
{
    if (fd < 0 || fd >= l->nw || !l->w[fd])
        return -ENOENT;
    struct watcher *w = l->w[fd];
    if (w->events == events)
        return 0;
    struct epoll_event ev = { .events = events, .data.ptr = w };
    if (epoll_ctl(l->epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
        return -errno;
    w->events = events;
    return 0;
}

static void reclaim_dead(struct vd_loop *l)
{
    while (l->dead) {
        struct watcher *w = l->dead;
        l->dead = w->next_dead;
        free(w);
    }
}

void vd_loop_del_fd(struct vd_loop *l, int fd)
{
    if (fd < 0 || fd >= l->nw || !l->w[fd])
        return;
    struct watcher *w = l->w[fd];
    /* The fd may already be closed (then epoll forgot it by itself). */
    epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
    l->w[fd] = NULL;
    w->dead = true;
    w->next_dead = l->dead;
    l->dead = w;
    if (l->depth == 0)
        reclaim_dead(l);
}

/* ---- posted work ---- */

static void wake(struct vd_loop *l)
{
    uint64_t one = 1;
    while (write(l->post_fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

void vd_loop_post(struct vd_loop *l, vd_fn fn, void *opaque)
{
    struct posted *p = malloc(sizeof(*p));
    if (!p)
        abort();        /* losing work silently would be worse */
    *p = (struct posted){ .fn = fn, .opaque = opaque };
    pthread_mutex_lock(&l->post_lock);
    bool was_empty = !l->post_head;
    if (l->post_tail)
        l->post_tail->next = p;
    else
        l->post_head = p;
    l->post_tail = p;
    pthread_mutex_unlock(&l->post_lock);
    if (was_empty)
        wake(l);
}

void vd_loop_post_node(struct vd_loop *l, struct vd_post_node *node)
{
    struct vd_post_node *head = atomic_load(&l->nodes);
    do
        node->next = head;
    while (!atomic_compare_exchange_weak(&l->nodes, &head, node));
    /* Sequentially consistent with the loop's store of sleeping and its
     * load of nodes before it sleeps: either it sees this node, or we see
     * it sleeping and wake it. A non-empty queue was someone else's wake. */
    if (!head && atomic_load(&l->sleeping))
        wake(l);
}

static int run_nodes(struct vd_loop *l)
{
    struct vd_post_node *p = atomic_exchange(&l->nodes, NULL), *fifo = NULL;
    int n = 0;
    while (p) {                     /* newest first: reverse */
        struct vd_post_node *next = p->next;
        p->next = fifo;
        fifo = p;
        p = next;
    }
    while (fifo) {
        struct vd_post_node *next = fifo->next;
        fifo->fn(fifo->opaque);     /* may free the node */
        fifo = next;
        n++;
    }
    return n;
}

static int run_posted(struct vd_loop *l)
{
    uint64_t cnt;
    /* Read the eventfd before taking the list: a post that lands after the
     * take finds the list empty and wakes us again. */
    if (read(l->post_fd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
        return 0;
    pthread_mutex_lock(&l->post_lock);
    struct posted *p = l->post_head;
    l->post_head = l->post_tail = NULL;
    pthread_mutex_unlock(&l->post_lock);
    int n = 0;
    while (p) {
        struct posted *next = p->next;
        vd_fn fn = p->fn;
        void *opaque = p->opaque;
        free(p);
        fn(opaque);
        n++;
        p = next;
    }
    return n;
}

static void post_cb(struct vd_loop *l, int fd, uint32_t events, void *opaque)
{
    run_posted(l);
}

static void engine_cb(struct vd_loop *l, int fd, uint32_t events, void *opaque)
{
    l->eops->reap(l->engine);
}

/* ---- timers ---- */

uint64_t vd_loop_timer(struct vd_loop *l, uint64_t ms, vd_fn fn, void *opaque)
{
    struct timer *t = calloc(1, sizeof(*t));
    if (!t)
        abort();
    if (ms > UINT64_MAX / 2000000u)
        ms = UINT64_MAX / 2000000u;
    t->id = ++l->next_timer_id;
    t->deadline = now_ns() + ms * 1000000u;
    t->fn = fn;
    t->opaque = opaque;
    /* New timers usually fire last: search from the tail. */
    struct timer *after = NULL;
    if (l->timers) {
        struct timer *last = l->timers;
        while (last->next)
            last = last->next;
        for (after = last; after && after->deadline > t->deadline; after = after->prev)
            ;
    }
    if (after) {
        t->prev = after;
        t->next = after->next;
        if (after->next)
            after->next->prev = t;
        after->next = t;
    } else {
        t->next = l->timers;
        if (l->timers)
            l->timers->prev = t;
        l->timers = t;
    }
    return t->id;
}

static void unlink_timer(struct vd_loop *l, struct timer *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        l->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
}

void vd_loop_cancel_timer(struct vd_loop *l, uint64_t id)
{
    for (struct timer *t = l->timers; t; t = t->next) {
        if (t->id == id) {
            unlink_timer(l, t);
            free(t);
            return;
        }
    }
}

static int run_timers(struct vd_loop *l)
{
    /* Only timers that exist now: one that re-arms itself for 0 ms waits
     * for the next iteration instead of spinning here. */
    uint64_t now = now_ns(), last_id = l->next_timer_id;
    int n = 0;
    for (;;) {
        struct timer *t = l->timers;
        while (t && t->id > last_id && t->deadline <= now)
            t = t->next;
        if (!t || t->deadline > now)
            break;
        unlink_timer(l, t);
        vd_fn fn = t->fn;
        void *opaque = t->opaque;
        free(t);
        fn(opaque);
        n++;
    }
    return n;
}

/* ---- the loop ---- */

static void free_lazy(void *p)
{
    struct vd_loop *l = p;
    if (l && l->lazy)
        vd_loop_free(l);
}

static void make_key(void)
{
    pthread_key_create(&lazy_key, free_lazy);
}

static int engine_start(struct vd_loop *l, enum vd_aio aio)
{
    static const struct vd_engine_ops *const order[] = {
        &vd_engine_io_uring, &vd_engine_aio, &vd_engine_threads,
    };
    const struct vd_engine_ops *ops = vd_engine_pick(aio);
    int r = ops->init(&l->engine, ENGINE_DEPTH);
    if (r < 0 && aio == VD_AIO_DEFAULT) {
        /* The default engine may still fail here (resource limits): fall
         * back along io_uring → native → threads. */
        size_t i = 0;
        while (order[i] != ops)
            i++;
        for (i++; r < 0 && i < sizeof(order) / sizeof(order[0]); i++) {
            ops = order[i];
            r = ops->init(&l->engine, ENGINE_DEPTH);
        }
    }
    if (r < 0)
        return vd_err(r, "cannot start the %s I/O engine: %s", ops->name, strerror(-r));
    l->eops = ops;
    l->engine_fd = ops->event_fd(l->engine);
    return 0;
}

int vd_loop_new(enum vd_aio aio, struct vd_loop **out)
{
    struct vd_loop *l = calloc(1, sizeof(*l));
    int r;
    if (!l)
        return -ENOMEM;
    l->post_fd = l->engine_fd = l->sched_fd = -1;
    pthread_mutex_init(&l->post_lock, NULL);
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (l->epfd < 0) {
        r = vd_err(-errno, "epoll_create1: %s", strerror(errno));
        goto fail;
    }
    l->post_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (l->post_fd < 0) {
        r = vd_err(-errno, "eventfd: %s", strerror(errno));
        goto fail;
    }
    r = engine_start(l, aio);
    if (r < 0)
        goto fail;
    r = vd_loop_add_fd(l, l->post_fd, EPOLLIN, post_cb, NULL);
    if (r == 0)
        r = vd_loop_add_fd(l, l->engine_fd, EPOLLIN, engine_cb, NULL);
    if (r < 0) {
        vd_err(r, "epoll_ctl: %s", strerror(-r));
        goto fail;
    }
    l->poll_max_ns = poll_default();
    l->poll_ns = l->poll_max_ns;
    cur_loop = l;
    *out = l;
    return 0;
fail:
    vd_loop_free(l);
    return r;
}

void vd_loop_free(struct vd_loop *l)
{
    if (!l)
        return;
    /* Offloaded work will post its completion here: wait for it. */
    while (atomic_load(&l->offloads) > 0)
        vd_loop_run_once(l, 100);
    if (l->engine) {
        vd_loop_del_fd(l, l->engine_fd);
        l->eops->fini(l->engine);
    }
    if (l->post_fd >= 0) {
        vd_loop_del_fd(l, l->post_fd);
        close(l->post_fd);
    }
    for (int i = 0; i < l->nw; i++)
        free(l->w[i]);
    free(l->w);
    reclaim_dead(l);
    while (l->timers) {
        struct timer *t = l->timers;
        l->timers = t->next;
        free(t);
    }
    while (l->post_head) {
        struct posted *p = l->post_head;
        l->post_head = p->next;
        free(p);
    }
    if (l->epfd >= 0)
        close(l->epfd);
    if (l->sched_fd >= 0)
        close(l->sched_fd);
    pthread_mutex_destroy(&l->post_lock);
    if (cur_loop == l)
        cur_loop = NULL;
    if (l->lazy)
        pthread_setspecific(lazy_key, NULL);
    free(l);
}

struct vd_loop *vd_loop_current(void)
{
    if (cur_loop)
        return cur_loop;
    struct vd_loop *l;
    if (vd_loop_new(VD_AIO_DEFAULT, &l) < 0)
        return NULL;
    /* Freed when the thread exits (nbdkit workers, helper threads). */
    pthread_once(&lazy_once, make_key);
    l->lazy = true;
    pthread_setspecific(lazy_key, l);
    return l;
}

const char *vd_loop_engine_name(struct vd_loop *l)
{
    return l->eops->name;
}

void vd_loop_submit_io(struct vd_loop *l, struct vd_io *io)
{
    io->loop = l;
    if (io->op == VD_IO_SYNC && io->file && vd_file_sync_skipped(io->file)) {
        /* cache=unsafe: the flush is acknowledged without syncing */
        io->xfer = 0;
        io->done(io, 0);
        return;
    }
    if (io->file && io->file->proto && io->file->proto->submit) {
        io->file->proto->submit(io->file, io);
        return;
    }
    if (l->inline_reads && io->op == VD_IO_READ && io->file && !io->file->direct &&
        io->file->fd >= 0) {
        if (!l->il_skip) {
            io->next = NULL;
            if (l->il_tail)
                l->il_tail->next = io;
            else
                l->il_head = io;
            l->il_tail = io;
            return;
        }
        l->il_skip--;
    }
    l->eops->submit(l->engine, io);
}

/* ---- inline reads ----
 * A read of a buffered file whose data is in the page cache is a memory
 * copy: through io_uring it still costs a submission, a completion, the
 * engine's eventfd and one more loop iteration before the reply can go
 * out. On loops that ask for it, such reads wait in a list until the next
 * flush point of this iteration and are tried there with
 * preadv2(RWF_NOWAIT), which copies what is cached and refuses (EAGAIN)
 * instead of waiting for the disk. A refused or partly done read goes to
 * the engine whole; after a refusal the next il_backoff reads (queued or
 * still to come) skip the try (doubling while they keep missing, so a
 * cold or larger-than-memory working set costs few wasted calls).
 * Completions run here, like reaped ones, never inside vd_loop_submit_io. */

#define IL_BACKOFF_MAX 1024u

void vd_loop_enable_inline_reads(struct vd_loop *l)
{
    const char *s = getenv("VDISK_INLINE_READS");
    l->inline_reads = !(s && !strcmp(s, "0"));
}

static void inline_miss(struct vd_loop *l)
{
    l->il_backoff = l->il_backoff ? l->il_backoff * 2 : 1;
    if (l->il_backoff > IL_BACKOFF_MAX)
        l->il_backoff = IL_BACKOFF_MAX;
    l->il_skip = l->il_backoff;
}

static int run_inline(struct vd_loop *l)
{
    int done = 0;
    while (l->il_head) {
        struct vd_io *io = l->il_head;
        l->il_head = io->next;
        if (!l->il_head)
            l->il_tail = NULL;
        if (l->il_skip) {           /* a read of this batch missed: the rest too, likely */
            l->il_skip--;
            l->eops->submit(l->engine, io);
            continue;
        }
        vd_io_begin(io);
        ssize_t n = preadv2(io->file->fd, io->cur_iov, io->cur_iovcnt, (off_t)io->off, RWF_NOWAIT);
        int res;
        if (n < 0 || (n > 0 && !vd_io_advance(io, n, &res))) {
            /* Not cached, partly cached, RWF_NOWAIT unsupported or any
             * other error: the engine does the whole read (and reports
             * real errors). */
            inline_miss(l);
            l->eops->submit(l->engine, io);
            continue;
        }
        if (n == 0)
            vd_io_advance(io, 0, &res);     /* end of file: zero-filled */
        l->il_backoff = 0;
        io->done(io, res);
        done++;
    }
    return done;
}

/* ---- polling ----
 * A sleep in epoll_wait costs a wake-up when the event comes: on a virtual
 * machine, a halted vCPU to restart; and a thread that sleeps after every
 * event is what the scheduler places on the CPU of the process it talks to
 * (an NBD client on the same host), so that the two take turns on one CPU
 * instead of running side by side. While the engine has requests in flight
 * an event is sure to come, often within the device's latency: look for it
 * without blocking for up to poll_ns first. The window adapts: when the
 * event came soon after polling gave up, it grows (up to poll_max_ns); when
 * the wait was longer than poll_max_ns, polling could not have caught it
 * and the window shrinks, to nothing for slow devices. The same holds for
 * the next request of a client right after one came (with reads served
 * inline, nothing is in flight meanwhile), as long as the loop's thread has
 * its CPU to itself (cpu_shared). Nothing in flight and no recent event:
 * no polling, so an idle loop costs nothing. */

#define POLL_START_NS 4000u

/* VDISK_POLL_NS from the environment: -1 when unset, -2 when invalid. */
static int64_t poll_env(void)
{
    const char *s = getenv("VDISK_POLL_NS");
    if (!s || !*s)
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno || s[0] == '-' || v > VD_LOOP_POLL_MAX_NS)
        return -2;
    return (int64_t)v;
}

int vd_loop_poll_env(uint64_t *ns)
{
    int64_t v = poll_env();
    if (v == -1)
        return 0;
    if (v < 0)
        return vd_err(-EINVAL, "VDISK_POLL_NS=%s: expected nanoseconds from 0 to %u",
                      getenv("VDISK_POLL_NS"), VD_LOOP_POLL_MAX_NS);
    *ns = (uint64_t)v;
    return 1;
}

static uint64_t poll_default(void)
{
    int64_t e = poll_env();
    return e < 0 ? 0 : (uint64_t)e;
}

void vd_loop_set_poll(struct vd_loop *l, uint64_t max_ns)
{
    if (max_ns > VD_LOOP_POLL_MAX_NS)
        max_ns = VD_LOOP_POLL_MAX_NS;
    l->poll_max_ns = max_ns;
    l->poll_ns = max_ns;
}

uint64_t vd_loop_get_poll(struct vd_loop *l)
{
    return l->poll_max_ns;
}

void vd_loop_enable_poll(struct vd_loop *l)
{
    if (poll_env() < 0 && l->poll_max_ns != VD_LOOP_POLL_NS_DEFAULT)
        vd_loop_set_poll(l, VD_LOOP_POLL_NS_DEFAULT);
}

static void poll_adapt(struct vd_loop *l, uint64_t slept)
{
    if (slept > l->poll_max_ns) {
        l->poll_ns /= 2;
        if (l->poll_ns < POLL_START_NS / 2)
            l->poll_ns = 0;
    } else if (l->poll_ns < l->poll_max_ns) {
        l->poll_ns = l->poll_ns ? l->poll_ns * 2 : POLL_START_NS;
        if (l->poll_ns > l->poll_max_ns)
            l->poll_ns = l->poll_max_ns;
    }
}

/* The blocking epoll_wait: posters of nodes wake the loop only while it
 * sleeps (see vd_loop_post_node). */
static int sleep_wait(struct vd_loop *l, struct epoll_event *ev, int nev, int timeout_ms)
{
    if (timeout_ms != 0) {
        atomic_store(&l->sleeping, true);
        if (atomic_load(&l->nodes))
            timeout_ms = 0;
    }
    int n = epoll_wait(l->epfd, ev, nev, timeout_ms);
    atomic_store(&l->sleeping, false);
    return n;
}

/* Whether another runnable thread shares this thread's CPU (on a small
 * machine, typically the NBD client). Polling would then only take that
 * thread's time: the scheduler gives a thread that slept a lot, like this
 * one, the CPU until its share is used up, while the client, whose
 * request would end the poll, waits. The sign is this thread's own wait
 * for a CPU (the run-queue delay in /proc/thread-self/schedstat) over a
 * 10 ms sample: more than 5 % of the time means the CPU is shared, and
 * polling stays off for the next 100 ms (a thread that sleeps waits less
 * for its CPU, so a sample taken then would miss the sharing). */
#define SHARED_SAMPLE_NS 10000000u
#define SHARED_HOLD_NS 100000000u

static bool cpu_shared(struct vd_loop *l, uint64_t now)
{
    if (now - l->sched_at < SHARED_SAMPLE_NS)
        return now < l->shared_until;
    pid_t tid = gettid();
    if (l->sched_tid != tid) {
        if (l->sched_fd >= 0)
            close(l->sched_fd);
        l->sched_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
        l->sched_tid = tid;
        l->sched_at = 0;
    }
    char buf[96];
    uint64_t run, wait;
    ssize_t n = l->sched_fd >= 0 ? pread(l->sched_fd, buf, sizeof buf - 1, 0) : -1;
    if (n > 0) {
        buf[n] = 0;
        if (sscanf(buf, "%" SCNu64 " %" SCNu64, &run, &wait) == 2) {
            if (l->sched_at && (wait - l->sched_wait) * 20 > now - l->sched_at)
                l->shared_until = now + SHARED_HOLD_NS;
            l->sched_wait = wait;
        }
    }
    /* without schedstat the thread is taken to have a CPU of its own */
    l->sched_at = now;
    return now < l->shared_until;
}

/* epoll_wait, polling first when worth it (see above). */
static int poll_wait(struct vd_loop *l, struct epoll_event *ev, int nev, int timeout_ms)
{
    if (!l->poll_max_ns || timeout_ms == 0)
        return sleep_wait(l, ev, nev, timeout_ms);
    uint64_t t0 = now_ns(), t = t0;
    bool busy = l->eops->busy && l->eops->busy(l->engine);
    if (!busy && !(l->events_recent && !cpu_shared(l, t0)))
        return sleep_wait(l, ev, nev, timeout_ms);
    uint64_t end = t0 + l->poll_ns;
    if (timeout_ms > 0 && end > t0 + (uint64_t)timeout_ms * 1000000u)
        end = t0 + (uint64_t)timeout_ms * 1000000u;
    while (t < end) {
        int n = epoll_wait(l->epfd, ev, nev, 0);
        /* posted nodes do not wake a loop that is not sleeping: look */
        if (n != 0 || atomic_load_explicit(&l->nodes, memory_order_relaxed) ||
            atomic_load_explicit(&l->stop, memory_order_relaxed))
            return n;
        t = now_ns();
    }
    if (timeout_ms > 0) {
        uint64_t spent_ms = (t - t0) / 1000000u;
        timeout_ms = spent_ms >= (uint64_t)timeout_ms ? 0 : timeout_ms - (int)spent_ms;
    }
    int n = sleep_wait(l, ev, nev, timeout_ms);
    if (n > 0)
        poll_adapt(l, now_ns() - t);
    return n;
}

void vd_loop_flush(struct vd_loop *l)
{
    l->eops->flush(l->engine);
}

int vd_loop_run_once(struct vd_loop *l, int timeout_ms)
{
    struct epoll_event ev[64];
    struct vd_loop *prev = cur_loop;
    int n, done = 0;

    cur_loop = l;       /* callbacks that submit work land on this loop */
    if (l->il_head)
        done += run_inline(l);
    l->eops->flush(l->engine);
    if (l->timers) {
        uint64_t now = now_ns();
        int64_t wait_ms = 0;
        if (l->timers->deadline > now)
            wait_ms = (int64_t)((l->timers->deadline - now + 999999) / 1000000);
        if (timeout_ms < 0 || wait_ms < timeout_ms)
            timeout_ms = (int)(wait_ms > 3600000 ? 3600000 : wait_ms);
    }
    n = poll_wait(l, ev, 64, timeout_ms);
    if (n < 0) {
        int r = errno == EINTR ? 0 : -errno;
        cur_loop = prev;
        return r;
    }
    l->depth++;
    l->events_recent = n > 0;
    if (atomic_load_explicit(&l->nodes, memory_order_relaxed))
        done += run_nodes(l);
    for (int i = 0; i < n; i++) {
        struct watcher *w = ev[i].data.ptr;
        if (w->dead)
            continue;
        w->cb(l, w->fd, ev[i].events, w->opaque);
        done++;
    }
    /* Start the I/O those events asked for before running timers (which
     * include sending replies): the device works while we do the rest.
     * Cached reads are done first, so their replies go out with the
     * timers of this iteration. */
    if (l->il_head)
        done += run_inline(l);
    l->eops->flush(l->engine);
    if (l->timers)
        done += run_timers(l);
    if (l->il_head)
        done += run_inline(l);
    l->eops->flush(l->engine);
    if (--l->depth == 0)
        reclaim_dead(l);
    cur_loop = prev;
    return done;
}

void vd_loop_run(struct vd_loop *l)
{
    while (!atomic_load(&l->stop))
        vd_loop_run_once(l, -1);
    atomic_store(&l->stop, false);
}

void vd_loop_stop(struct vd_loop *l)
{
    atomic_store(&l->stop, true);
    wake(l);
}

/* ---- the shared worker pool ----
 *
 * Offloaded jobs are slow, synchronous calls: compression, fdatasync, and
 * the format calls of gated disks (layers on RBD or NBD), where one job
 * blocks its thread for a network round trip, or for the whole RBD/NBD
 * timeout when the remote side is stalled. A fixed pool would let one
 * stalled disk hold every worker and starve every other disk, so the pool
 * is elastic:
 *
 * - base threads (2, or VDISK_WORKERS=1..64) start with the first job and
 *   are always kept;
 * - a worker counts as blocked when its job has run for POOL_STALL_MS and
 *   its thread used less than a quarter of that time on a CPU (a job
 *   waiting on a socket uses next to none; a CPU-bound one, say
 *   compression, is busy, not blocked, and more threads would not help,
 *   even when a loaded machine gives it only part of a CPU);
 * - while jobs are queued beyond the idle workers, the pool keeps base
 *   workers that are not blocked: it starts one more thread for each
 *   blocked one, up to POOL_MAX threads in all;
 * - threads beyond base exit once idle for VDISK_WORKERS_IDLE_MS (10 s).
 *
 * A stall may begin after the last job was queued, so the check cannot
 * live only in vd_loop_offload: one monitor thread does it. It sleeps on
 * its own condition variable while every queued job has an idle worker
 * waiting for it (the common case costs the enqueuer nothing more than
 * before), and otherwise waits with a timeout until the oldest running job
 * reaches the threshold, then decides. Threads are counted idle from the
 * moment they are created, so one backlog does not start two threads. */

#define POOL_MAX        64          /* threads in all, base included */
#define POOL_STALL_MS   5
#define POOL_IDLE_MS    10000       /* default of VDISK_WORKERS_IDLE_MS */

struct job {
    vd_fn fn, done;
    void *opaque;
    struct vd_loop *loop;
    struct job *next;
};

/* A worker while it runs a job (on its stack, in pool.running). */
struct worker {
    bool has_cpu;
    clockid_t cpu;                  /* the thread's CPU-time clock */
    uint64_t started;               /* CLOCK_MONOTONIC ns at job start */
    uint64_t cpu_started;           /* the thread's CPU time then */
    struct worker *prev, *next;
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;            /* workers: a job was queued */
    pthread_cond_t mon_cond;        /* monitor: a job waits for a thread */
    struct job *head, *tail;
    int queued;                     /* jobs in the queue */
    int nthreads;                   /* workers alive */
    int idle;                       /* workers not running a job */
    int base;                       /* workers always kept */
    uint64_t idle_ns;               /* extra workers exit after this */
    bool monitor, mon_asleep;
    struct worker *running;
} pool = { .lock = PTHREAD_MUTEX_INITIALIZER };

static uint64_t pool_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct timespec pool_ts(uint64_t ns)
{
    return (struct timespec){ .tv_sec = ns / 1000000000u, .tv_nsec = ns % 1000000000u };
}

static uint64_t clock_ns(clockid_t c)
{
    struct timespec ts;
    if (clock_gettime(c, &ts) < 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Both condition variables time out on CLOCK_MONOTONIC (a wall-clock
 * step must not end idle periods early or stretch the monitor's wait). */
static void pool_init_conds(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&pool.cond, &a);
    pthread_cond_init(&pool.mon_cond, &a);
    pthread_condattr_destroy(&a);
}

/* A child of fork() has none of the pool's threads: start afresh (jobs
 * queued in the parent are the parent's business). */
static void pool_after_fork_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pool_init_conds();
    pool.head = pool.tail = NULL;
    pool.queued = pool.nthreads = pool.idle = 0;
    pool.monitor = pool.mon_asleep = false;
    pool.running = NULL;
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void pool_init_once(void)
{
    pool_init_conds();
    pthread_atfork(NULL, NULL, pool_after_fork_child);
}

static void job_done(void *opaque)
{
    struct job *j = opaque;
    struct vd_loop *l = j->loop;
    if (j->done)
        j->done(j->opaque);
    free(j);
    atomic_fetch_sub(&l->offloads, 1);
}

static void *pool_worker(void *arg)
{
    (void)arg;
    struct worker w = { 0 };
    w.has_cpu = pthread_getcpuclockid(pthread_self(), &w.cpu) == 0;
    /* The thread's CPU time when its next job starts: read outside the
     * lock, after each job (waiting for one uses next to no CPU). */
    uint64_t cpu = w.has_cpu ? clock_ns(CLOCK_THREAD_CPUTIME_ID) : 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        uint64_t idle_until = pool_now() + pool.idle_ns;
        while (!pool.head) {
            if (pool.nthreads <= pool.base) {
                pthread_cond_wait(&pool.cond, &pool.lock);
                continue;
            }
            if (pool_now() >= idle_until) {
                /* an extra thread, idle long enough: the pool shrinks */
                pool.nthreads--;
                pool.idle--;
                pthread_mutex_unlock(&pool.lock);
                return NULL;
            }
            struct timespec ts = pool_ts(idle_until);
            pthread_cond_timedwait(&pool.cond, &pool.lock, &ts);
        }
        struct job *j = pool.head;
        pool.head = j->next;
        if (!pool.head)
            pool.tail = NULL;
        pool.queued--;
        pool.idle--;
        w.started = pool_now();
        w.cpu_started = cpu;
        w.prev = NULL;
        w.next = pool.running;
        if (pool.running)
            pool.running->prev = &w;
        pool.running = &w;
        pthread_mutex_unlock(&pool.lock);
        j->fn(j->opaque);
        vd_loop_post(j->loop, job_done, j);
        cpu = w.has_cpu ? clock_ns(CLOCK_THREAD_CPUTIME_ID) : 0;
        pthread_mutex_lock(&pool.lock);
        if (w.prev)
            w.prev->next = w.next;
        else
            pool.running = w.next;
        if (w.next)
            w.next->prev = w.prev;
        pool.idle++;
    }
    return NULL;
}

/* Under pool.lock. 0, or -errno when no thread could be created. */
static int pool_spawn(void)
{
    pthread_t t;
    pool.idle++;                    /* before it runs: see the top comment */
    pool.nthreads++;
    int r = pthread_create(&t, NULL, pool_worker, NULL);
    if (r != 0) {
        pool.idle--;
        pool.nthreads--;
        return -r;
    }
    pthread_detach(t);
    return 0;
}

/* Under pool.lock: has w's job run long without using the CPU? */
static bool worker_blocked(struct worker *w, uint64_t ran)
{
    if (!w->has_cpu)
        return true;
    uint64_t cpu = clock_ns(w->cpu) - w->cpu_started;
    return cpu < ran / 4;
}

static void *pool_monitor(void *arg)
{
    (void)arg;
    const uint64_t stall = POOL_STALL_MS * 1000000ull;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        if (pool.queued <= pool.idle) {
            /* every queued job has an idle worker: nothing to do */
            pool.mon_asleep = true;
            pthread_cond_wait(&pool.mon_cond, &pool.lock);
            pool.mon_asleep = false;
            continue;
        }
        uint64_t now = pool_now(), next = now + stall;
        int blocked = 0;
        for (struct worker *w = pool.running; w; w = w->next) {
            uint64_t ran = now - w->started;
            if (ran < stall) {
                if (w->started + stall < next)
                    next = w->started + stall;
            } else if (worker_blocked(w, ran)) {
                blocked++;
            }
        }
        if (blocked > 0 && pool.nthreads - blocked < pool.base &&
            pool.nthreads < POOL_MAX && pool_spawn() == 0)
            continue;               /* look again: more may be needed */
        struct timespec ts = pool_ts(next);
        pthread_cond_timedwait(&pool.mon_cond, &pool.lock, &ts);
    }
    return NULL;
}

static int env_int(const char *name, int def, int min, int max)
{
    const char *s = getenv(name);
    char *end;
    if (!s || !*s)
        return def;
    long n = strtol(s, &end, 10);
    return *end == 0 && n >= min && n <= max ? (int)n : def;
}

/* Under pool.lock, on the first job (or the first after fork). */
static void pool_start(void)
{
    pool.base = env_int("VDISK_WORKERS", 2, 1, POOL_MAX);
    pool.idle_ns = (uint64_t)env_int("VDISK_WORKERS_IDLE_MS", POOL_IDLE_MS, 1, 3600000) * 1000000u;
    for (int i = 0; i < pool.base; i++)
        pool_spawn();
    if (pool.nthreads > 0 && !pool.monitor) {
        /* Without it the pool still works, only at its base size. */
        pthread_t t;
        if (pthread_create(&t, NULL, pool_monitor, NULL) == 0) {
            pthread_detach(t);
            pool.monitor = true;
        }
    }
}

void vd_loop_offload(struct vd_loop *l, vd_fn fn, vd_fn done, void *opaque)
{
    struct job *j = malloc(sizeof(*j));
    if (!j) {
        /* Out of memory: do the work here, as when no thread can be
         * started, and hand done to the loop the way a worker would. */
        fn(opaque);
        if (done)
            vd_loop_post(l, done, opaque);
        return;
    }
    *j = (struct job){ .fn = fn, .done = done, .opaque = opaque, .loop = l };
    atomic_fetch_add(&l->offloads, 1);
    pthread_once(&pool_once, pool_init_once);
    pthread_mutex_lock(&pool.lock);
    if (pool.nthreads == 0)
        pool_start();
    if (pool.nthreads == 0) {
        /* No thread could be started: run it here, finish it later. */
        pthread_mutex_unlock(&pool.lock);
        fn(opaque);
        vd_loop_post(l, job_done, j);
        return;
    }
    if (pool.tail)
        pool.tail->next = j;
    else
        pool.head = j;
    pool.tail = j;
    pool.queued++;
    pthread_cond_signal(&pool.cond);
    if (pool.queued > pool.idle && pool.mon_asleep)
        pthread_cond_signal(&pool.mon_cond);
    pthread_mutex_unlock(&pool.lock);
}
