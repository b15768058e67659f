/* The event loop: posted work across threads, timers, offload to the
 * worker pool, fd watchers, nesting and the per-thread current loop. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "vdisk/error.h"
#include "vdisk/loop.h"

static uint64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void run_while(struct vd_loop *l, const int *cond)
{
    uint64_t end = ms_now() + 10000;
    while (*cond && ms_now() < end)
        assert_true(vd_loop_run_once(l, 100) >= 0);
    assert_int_equal(*cond, 0);
}

/* ---- post ---- */

#define POSTERS 4
#define POSTS 2000

struct post_ctx {
    struct vd_loop *loop;
    pthread_t loop_thread;
    int count;              /* touched only on the loop thread */
    int left;
    bool wrong_thread;
};

static void count_post(void *opaque)
{
    struct post_ctx *c = opaque;
    if (!pthread_equal(pthread_self(), c->loop_thread))
        c->wrong_thread = true;
    c->count++;
    c->left--;
}

static void *poster(void *arg)
{
    struct post_ctx *c = arg;
    for (int i = 0; i < POSTS; i++)
        vd_loop_post(c->loop, count_post, c);
    return NULL;
}

static void post_threads(void **s)
{
    struct post_ctx c = { .loop_thread = pthread_self(), .left = POSTERS * POSTS };
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &c.loop), 0);
    assert_ptr_equal(vd_loop_current(), c.loop);
    pthread_t t[POSTERS];
    for (int i = 0; i < POSTERS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, poster, &c), 0);
    run_while(c.loop, &c.left);
    for (int i = 0; i < POSTERS; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(c.count, POSTERS * POSTS);
    assert_false(c.wrong_thread);
    vd_loop_free(c.loop);
}

/* vd_loop_post_node: lock-free pushes from several threads, each thread's
 * nodes run in order on the loop thread, and no wake-up is lost (the loop
 * waits with a long timeout: a lost wake-up shows as a wait that ends with
 * nothing done). */
struct node_ctx {
    struct vd_loop *loop;
    pthread_t loop_thread;
    int left;
    bool wrong_thread, out_of_order;
};

struct node_item {
    struct vd_post_node node;
    struct node_ctx *c;
    int *last;              /* the poster's last sequence number run */
    int seq;
};

static void node_run(void *opaque)
{
    struct node_item *it = opaque;
    struct node_ctx *c = it->c;
    if (!pthread_equal(pthread_self(), c->loop_thread))
        c->wrong_thread = true;
    if (it->seq != *it->last + 1)
        c->out_of_order = true;
    *it->last = it->seq;
    c->left--;
}

struct node_poster {
    struct node_ctx *c;
    struct node_item items[POSTS];
    int last;
};

static void *node_poster_run(void *arg)
{
    struct node_poster *p = arg;
    for (int i = 0; i < POSTS; i++) {
        p->items[i] = (struct node_item){ .c = p->c, .last = &p->last, .seq = i };
        p->items[i].node.fn = node_run;
        p->items[i].node.opaque = &p->items[i];
        vd_loop_post_node(p->c->loop, &p->items[i].node);
        if (i % 64 == 0)
            usleep(50);     /* let the loop go to sleep now and then */
    }
    return NULL;
}

static void post_node_threads(void **s)
{
    struct node_ctx c = { .loop_thread = pthread_self(), .left = POSTERS * POSTS };
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &c.loop), 0);
    struct node_poster *p = calloc(POSTERS, sizeof(*p));
    assert_non_null(p);
    pthread_t t[POSTERS];
    for (int i = 0; i < POSTERS; i++) {
        p[i].c = &c;
        p[i].last = -1;
        assert_int_equal(pthread_create(&t[i], NULL, node_poster_run, &p[i]), 0);
    }
    bool lost = false;
    while (c.left > 0 && !lost) {
        /* 0 also comes back when a signal interrupts the wait: only a
         * wait that ran its whole course with work queued is a lost wake */
        uint64_t t0 = ms_now();
        lost = vd_loop_run_once(c.loop, 20000) == 0 && c.left > 0 && ms_now() - t0 >= 19000;
    }
    for (int i = 0; i < POSTERS; i++)
        pthread_join(t[i], NULL);
    assert_false(lost);
    assert_int_equal(c.left, 0);
    assert_false(c.wrong_thread);
    assert_false(c.out_of_order);
    for (int i = 0; i < POSTERS; i++)
        assert_int_equal(p[i].last, POSTS - 1);
    free(p);
    vd_loop_free(c.loop);
}

/* ---- stop from another thread ---- */

static void *stopper(void *arg)
{
    usleep(50000);
    vd_loop_stop(arg);
    return NULL;
}

static void stop_thread(void **s)
{
    struct vd_loop *l;
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
    pthread_t t;
    uint64_t t0 = ms_now();
    assert_int_equal(pthread_create(&t, NULL, stopper, l), 0);
    vd_loop_run(l);          /* returns only once stopped */
    pthread_join(t, NULL);
    assert_true(ms_now() - t0 >= 40);
    /* stop before run: the next run returns at once, then the flag clears */
    vd_loop_stop(l);
    vd_loop_run(l);
    vd_loop_free(l);
}

/* ---- timers ---- */

struct tctx {
    int order[8];
    int n;
    int left;
    struct vd_loop *loop;
    int rearm;
    uint64_t fired_at[8];
};

struct targ {
    struct tctx *c;
    int v;
};

static void fire(void *opaque)
{
    struct targ *a = opaque;
    a->c->fired_at[a->c->n] = ms_now();
    a->c->order[a->c->n++] = a->v;
    a->c->left--;
}

static void timers(void **s)
{
    struct tctx c = { 0 };
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &c.loop), 0);
    struct targ a[5] = { { &c, 30 }, { &c, 10 }, { &c, 20 }, { &c, 0 }, { &c, 99 } };
    uint64_t t0 = ms_now();
    vd_loop_timer(c.loop, 60, fire, &a[0]);
    vd_loop_timer(c.loop, 20, fire, &a[1]);
    vd_loop_timer(c.loop, 40, fire, &a[2]);
    vd_loop_timer(c.loop, 0, fire, &a[3]);
    uint64_t id = vd_loop_timer(c.loop, 30, fire, &a[4]);
    vd_loop_cancel_timer(c.loop, id);
    vd_loop_cancel_timer(c.loop, 123456);   /* unknown: ignored */
    c.left = 4;
    run_while(c.loop, &c.left);
    assert_int_equal(c.n, 4);
    assert_int_equal(c.order[0], 0);
    assert_int_equal(c.order[1], 10);
    assert_int_equal(c.order[2], 20);
    assert_int_equal(c.order[3], 30);
    assert_true(c.fired_at[1] - t0 >= 20);
    assert_true(c.fired_at[3] - t0 >= 60);
    /* the cancelled one never fires */
    vd_loop_run_once(c.loop, 50);
    assert_int_equal(c.n, 4);
    vd_loop_free(c.loop);
}

/* A timer that re-arms itself for 0 ms must not starve the loop. */
static void rearm(void *opaque)
{
    struct tctx *c = opaque;
    if (++c->rearm < 1000000)
        vd_loop_timer(c->loop, 0, rearm, c);
}

static void timer_rearm(void **s)
{
    struct tctx c = { 0 };
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &c.loop), 0);
    vd_loop_timer(c.loop, 0, rearm, &c);
    for (int i = 0; i < 5; i++)
        vd_loop_run_once(c.loop, 0);
    assert_int_equal(c.rearm, 5);
    vd_loop_free(c.loop);        /* frees the pending timer */
}

/* ---- offload ---- */

struct off_ctx {
    pthread_t loop_thread;
    atomic_int ran_elsewhere;
    int done_on_loop;
    int left;
};

static void off_work(void *opaque)
{
    struct off_ctx *c = opaque;
    if (!pthread_equal(pthread_self(), c->loop_thread))
        atomic_fetch_add(&c->ran_elsewhere, 1);
    usleep(1000);
}

static void off_done(void *opaque)
{
    struct off_ctx *c = opaque;
    if (pthread_equal(pthread_self(), c->loop_thread))
        c->done_on_loop++;
    c->left--;
}

static void offload(void **s)
{
    struct vd_loop *l;
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
    struct off_ctx c = { .loop_thread = pthread_self(), .left = 50 };
    for (int i = 0; i < 50; i++)
        vd_loop_offload(l, off_work, off_done, &c);
    run_while(l, &c.left);
    assert_int_equal(atomic_load(&c.ran_elsewhere), 50);
    assert_int_equal(c.done_on_loop, 50);
    /* free waits for offloaded work still running */
    c.left = 3;
    for (int i = 0; i < 3; i++)
        vd_loop_offload(l, off_work, off_done, &c);
    vd_loop_offload(l, off_work, NULL, &c);
    vd_loop_free(l);
    assert_int_equal(c.left, 0);
}

/* After fork() the child has no pool threads: offload must still work. */
static void offload_after_fork(void **s)
{
    struct vd_loop *l;
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
    struct off_ctx c = { .loop_thread = pthread_self(), .left = 1 };
    vd_loop_offload(l, off_work, off_done, &c);     /* starts the pool here */
    run_while(l, &c.left);
    vd_loop_free(l);
    pid_t pid = fork();
    if (pid == 0) {
        struct vd_loop *cl;
        struct off_ctx cc = { .loop_thread = pthread_self(), .left = 3 };
        if (vd_loop_new(VD_AIO_DEFAULT, &cl) < 0)
            _exit(2);
        for (int i = 0; i < 3; i++)
            vd_loop_offload(cl, off_work, off_done, &cc);
        for (int i = 0; i < 100 && cc.left; i++)
            vd_loop_run_once(cl, 100);
        _exit(cc.left == 0 && atomic_load(&cc.ran_elsewhere) == 3 ? 0 : 1);
    }
    int st = 0;
    for (int i = 0; i < 300 && waitpid(pid, &st, WNOHANG) == 0; i++)
        usleep(50000);
    if (waitpid(pid, &st, WNOHANG) == 0) {     /* stuck: fail, do not hang */
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
    }
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

/* ---- fd watchers ---- */

struct fd_ctx {
    int pipefd[2];
    int reads, writes;
    char got[16];
    int ngot;
    struct vd_loop *loop;
};

static void on_read(struct vd_loop *l, int fd, uint32_t ev, void *opaque)
{
    struct fd_ctx *c = opaque;
    assert_true(ev & EPOLLIN);
    ssize_t n = read(fd, c->got + c->ngot, 1);    /* one byte: level-triggered repeats */
    assert_int_equal(n, 1);
    c->ngot++;
    c->reads++;
}

static void on_write(struct vd_loop *l, int fd, uint32_t ev, void *opaque)
{
    struct fd_ctx *c = opaque;
    assert_true(ev & EPOLLOUT);
    c->writes++;
    /* stop asking for writability from inside the callback */
    assert_int_equal(vd_loop_mod_fd(l, fd, 0), 0);
}

static void fd_watch(void **s)
{
    struct fd_ctx c = { 0 };
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &c.loop), 0);
    assert_int_equal(pipe(c.pipefd), 0);
    assert_int_equal(vd_loop_add_fd(c.loop, c.pipefd[0], EPOLLIN, on_read, &c), 0);
    assert_int_equal(vd_loop_add_fd(c.loop, c.pipefd[0], EPOLLIN, on_read, &c), -EEXIST);
    assert_int_equal(vd_loop_add_fd(c.loop, -1, EPOLLIN, on_read, &c), -EINVAL);
    assert_int_equal(vd_loop_mod_fd(c.loop, 9999, EPOLLIN), -ENOENT);
    assert_int_equal(write(c.pipefd[1], "abc", 3), 3);
    for (int i = 0; i < 10 && c.reads < 3; i++)
        vd_loop_run_once(c.loop, 1000);
    assert_int_equal(c.reads, 3);
    assert_memory_equal(c.got, "abc", 3);
    /* nothing more to read: a zero timeout returns without calling back */
    assert_int_equal(vd_loop_run_once(c.loop, 0), 0);
    assert_int_equal(c.reads, 3);

    assert_int_equal(vd_loop_add_fd(c.loop, c.pipefd[1], EPOLLOUT, on_write, &c), 0);
    for (int i = 0; i < 3; i++)
        vd_loop_run_once(c.loop, 100);
    assert_int_equal(c.writes, 1);
    assert_int_equal(vd_loop_mod_fd(c.loop, c.pipefd[1], EPOLLOUT), 0);
    vd_loop_run_once(c.loop, 100);
    assert_int_equal(c.writes, 2);

    vd_loop_del_fd(c.loop, c.pipefd[0]);
    vd_loop_del_fd(c.loop, c.pipefd[0]);     /* twice: harmless */
    assert_int_equal(write(c.pipefd[1], "d", 1), 1);
    assert_int_equal(vd_loop_run_once(c.loop, 20), 0);
    assert_int_equal(c.reads, 3);
    vd_loop_del_fd(c.loop, c.pipefd[1]);
    close(c.pipefd[0]);
    close(c.pipefd[1]);
    vd_loop_free(c.loop);
}

/* Two ready fds; the first callback removes and closes the second: its
 * pending event must not be delivered to the freed watcher. */
struct del_ctx {
    int a[2], b[2];
    int calls_a, calls_b;
};

static void del_other(struct vd_loop *l, int fd, uint32_t ev, void *opaque)
{
    struct del_ctx *c = opaque;
    int other = fd == c->a[0] ? c->b[0] : c->a[0];
    if (fd == c->a[0]) c->calls_a++; else c->calls_b++;
    vd_loop_del_fd(l, other);
    vd_loop_del_fd(l, fd);
}

static void fd_del_in_callback(void **s)
{
    struct vd_loop *l;
    struct del_ctx c = { 0 };
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
    assert_int_equal(pipe(c.a), 0);
    assert_int_equal(pipe(c.b), 0);
    assert_int_equal(write(c.a[1], "x", 1), 1);
    assert_int_equal(write(c.b[1], "x", 1), 1);
    assert_int_equal(vd_loop_add_fd(l, c.a[0], EPOLLIN, del_other, &c), 0);
    assert_int_equal(vd_loop_add_fd(l, c.b[0], EPOLLIN, del_other, &c), 0);
    assert_int_equal(vd_loop_run_once(l, 1000), 1);
    assert_int_equal(c.calls_a + c.calls_b, 1);
    for (int i = 0; i < 2; i++) {
        close(c.a[i]);
        close(c.b[i]);
    }
    vd_loop_free(l);
}

/* ---- nesting: a callback runs the loop until its own work is done ---- */

struct nest_ctx {
    struct vd_loop *loop;
    int inner_left;
    int outer_done;
};

static void inner(void *opaque)
{
    struct nest_ctx *c = opaque;
    c->inner_left--;
}

static void outer(void *opaque)
{
    struct nest_ctx *c = opaque;
    c->inner_left = 2;
    vd_loop_post(c->loop, inner, c);
    vd_loop_timer(c->loop, 5, inner, c);
    while (c->inner_left > 0)
        vd_loop_run_once(c->loop, 100);
    c->outer_done = 1;
}

static void nested(void **s)
{
    struct nest_ctx c = { 0 };
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &c.loop), 0);
    vd_loop_post(c.loop, outer, &c);
    for (int i = 0; i < 10 && !c.outer_done; i++)
        vd_loop_run_once(c.loop, 100);
    assert_int_equal(c.outer_done, 1);
    assert_int_equal(c.inner_left, 0);
    vd_loop_free(c.loop);
}

/* ---- the current loop of a thread ---- */

static void *lazy_thread(void *arg)
{
    struct vd_loop *l = vd_loop_current();
    assert_non_null(l);
    assert_ptr_equal(vd_loop_current(), l);
    *(struct vd_loop **)arg = l;
    assert_non_null(vd_loop_engine_name(l));
    return NULL;     /* the loop is freed at thread exit (LeakSanitizer checks) */
}

static void record_current(void *opaque)
{
    *(struct vd_loop **)opaque = vd_loop_current();
}

static void current(void **s)
{
    struct vd_loop *a = NULL, *b = NULL;
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, lazy_thread, &a), 0);
    pthread_join(t, NULL);
    assert_int_equal(pthread_create(&t, NULL, lazy_thread, &b), 0);
    pthread_join(t, NULL);
    assert_non_null(a);
    assert_non_null(b);

    struct vd_loop *l, *m;
    assert_int_equal(vd_loop_new(VD_AIO_THREADS, &l), 0);
    assert_string_equal(vd_loop_engine_name(l), "threads");
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &m), 0);
    assert_ptr_equal(vd_loop_current(), m);
    vd_loop_free(m);
    /* running a loop makes it current for its callbacks */
    struct vd_loop *seen = NULL;
    vd_loop_post(l, record_current, &seen);
    vd_loop_run_once(l, 1000);
    assert_ptr_equal(seen, l);
    vd_loop_free(l);
}

/* ---- polling ----
 * With I/O in flight the loop polls before sleeping; what it waits for
 * must still arrive: completions, timers, posted work and a stop. A read
 * on an empty pipe keeps the engine busy for as long as the test wants. */

struct pio {
    struct vd_io io;
    struct iovec iov;
    char byte;
    int res;
    bool done;
    struct vd_file file;
    int pipefd[2];
};

static void pio_done(struct vd_io *io, int res)
{
    struct pio *p = (struct pio *)io;
    p->res = res;
    p->done = true;
}

static void pio_start(struct vd_loop *l, struct pio *p)
{
    memset(p, 0, sizeof(*p));
    assert_int_equal(pipe(p->pipefd), 0);
    p->file = (struct vd_file){ .fd = p->pipefd[0], .name = "pipe", .align = 1 };
    p->iov = (struct iovec){ &p->byte, 1 };
    p->io = (struct vd_io){ .op = VD_IO_READ, .file = &p->file, .iov = &p->iov, .iovcnt = 1,
                            .done = pio_done };
    vd_loop_submit_io(l, &p->io);
}

static void pio_end(struct pio *p)
{
    close(p->pipefd[0]);
    close(p->pipefd[1]);
}

static void write_x(void *opaque)
{
    struct pio *p = opaque;
    assert_int_equal(write(p->pipefd[1], "x", 1), 1);
}

static void poll_delivers(void **s)
{
    struct vd_loop *l;
    assert_int_equal(vd_loop_new(VD_AIO_IO_URING, &l), 0);
    vd_loop_set_poll(l, 5000000);     /* 5 ms windows */
    struct pio p;
    pio_start(l, &p);
    /* a zero timeout never polls: nothing is ready, so nothing happens */
    assert_int_equal(vd_loop_run_once(l, 0), 0);
    assert_false(p.done);
    /* the completion comes from a timer's write: both must be delivered */
    vd_loop_timer(l, 2, write_x, &p);
    for (int i = 0; i < 1000 && !p.done; i++)
        assert_true(vd_loop_run_once(l, 1000) >= 0);
    assert_true(p.done);
    assert_int_equal(p.res, 0);
    assert_int_equal(p.byte, 'x');
    /* posted work reaches a polling loop too */
    pio_end(&p);
    pio_start(l, &p);
    vd_loop_post(l, write_x, &p);
    for (int i = 0; i < 1000 && !p.done; i++)
        assert_true(vd_loop_run_once(l, 1000) >= 0);
    assert_true(p.done);
    pio_end(&p);
    /* polling off and on again */
    vd_loop_set_poll(l, 0);
    pio_start(l, &p);
    vd_loop_timer(l, 1, write_x, &p);
    for (int i = 0; i < 1000 && !p.done; i++)
        assert_true(vd_loop_run_once(l, 1000) >= 0);
    assert_true(p.done);
    pio_end(&p);
    vd_loop_free(l);
}

/* Loops start without polling; the environment sets the default and
 * overrides vd_loop_enable_poll, not an explicit vd_loop_set_poll. */
static void poll_settings(void **s)
{
    struct vd_loop *l;
    unsetenv("VDISK_POLL_NS");
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
    assert_int_equal(vd_loop_get_poll(l), 0);
    vd_loop_enable_poll(l);
    assert_int_equal(vd_loop_get_poll(l), VD_LOOP_POLL_NS_DEFAULT);
    vd_loop_set_poll(l, 0);
    assert_int_equal(vd_loop_get_poll(l), 0);
    vd_loop_set_poll(l, UINT64_MAX);
    assert_int_equal(vd_loop_get_poll(l), VD_LOOP_POLL_MAX_NS);
    vd_loop_free(l);

    /* VDISK_POLL_NS: what a new loop has, what it has after
     * vd_loop_enable_poll, what vd_loop_poll_env says; nonsense is refused
     * by vd_loop_poll_env (vdiskd exits) and ignored by the loops. */
    static const struct {
        const char *env;
        uint64_t at_new, after_enable;
        int env_rc;
    } cases[] = {
        { "0", 0, 0, 1 },
        { "20000", 20000, 20000, 1 },
        { "12abc", 0, VD_LOOP_POLL_NS_DEFAULT, -EINVAL },
        { "-5", 0, VD_LOOP_POLL_NS_DEFAULT, -EINVAL },
        { "10000001", 0, VD_LOOP_POLL_NS_DEFAULT, -EINVAL },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t ns = 0;
        setenv("VDISK_POLL_NS", cases[i].env, 1);
        assert_int_equal(vd_loop_poll_env(&ns), cases[i].env_rc);
        if (cases[i].env_rc == 1)
            assert_int_equal(ns, cases[i].at_new);
        else
            assert_non_null(strstr(vd_errmsg(-EINVAL), "VDISK_POLL_NS"));
        assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
        assert_int_equal(vd_loop_get_poll(l), cases[i].at_new);
        vd_loop_enable_poll(l);
        assert_int_equal(vd_loop_get_poll(l), cases[i].after_enable);
        vd_loop_set_poll(l, 1000);          /* an explicit setting wins */
        assert_int_equal(vd_loop_get_poll(l), 1000);
        vd_loop_free(l);
    }
    unsetenv("VDISK_POLL_NS");
    uint64_t ns = 7;
    assert_int_equal(vd_loop_poll_env(&ns), 0);
    assert_int_equal(ns, 7);
}

/* ---- polling for fd input with nothing in flight ----
 * A loop that has just handled fd events (an NBD request) polls for the
 * next one although its engine is idle (the reply went out, the client's
 * next request is on its way), unless another thread shares its CPU. A
 * poll that catches the event leaves the thread's voluntary context
 * switches unchanged; a sleep in epoll_wait adds one. */

struct late_write {
    int fd;
    unsigned delay_us;
    int cpu;                /* runs on this CPU, or -1 */
};

static void pin_self(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    assert_int_equal(pthread_setaffinity_np(pthread_self(), sizeof set, &set), 0);
}

static void *late_write_thread(void *arg)
{
    struct late_write *w = arg;
    usleep(w->delay_us);
    assert_int_equal(write(w->fd, "x", 1), 1);
    return NULL;
}

static void read_byte(struct vd_loop *l, int fd, uint32_t events, void *opaque)
{
    char c;
    if (read(fd, &c, 1) == 1)
        (*(int *)opaque)++;
}

static long thread_cpu_us(void)
{
    struct rusage ru;
    assert_int_equal(getrusage(RUSAGE_THREAD, &ru), 0);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000L + ru.ru_utime.tv_usec +
           ru.ru_stime.tv_usec;
}

static long thread_sleeps(void)
{
    struct rusage ru;
    assert_int_equal(getrusage(RUSAGE_THREAD, &ru), 0);
    return ru.ru_nvcsw;
}

/* A loop watching a pipe, and the bytes it has read from it. */
struct pipe_loop {
    struct vd_loop *l;
    int fd[2];
    int got;
};

static void pipe_loop_open(struct pipe_loop *p)
{
    p->got = 0;
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &p->l), 0);
    assert_int_equal(pipe(p->fd), 0);
    assert_int_equal(vd_loop_add_fd(p->l, p->fd[0], EPOLLIN, read_byte, &p->got), 0);
}

static void pipe_loop_close(struct pipe_loop *p)
{
    vd_loop_del_fd(p->l, p->fd[0]);
    close(p->fd[0]);
    close(p->fd[1]);
    vd_loop_free(p->l);
}

/* A CPU of set other than cpu, or -1. */
static int other_cpu(const cpu_set_t *set, int cpu)
{
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (c != cpu && CPU_ISSET(c, set))
            return c;
    return -1;
}

/* One event, then one that comes 300 us later from another thread (on
 * writer_cpu unless -1): whether the loop slept for it. */
static bool slept_for_next(struct pipe_loop *p, int writer_cpu)
{
    int before = p->got;
    assert_int_equal(write(p->fd[1], "x", 1), 1);
    while (p->got == before)
        assert_true(vd_loop_run_once(p->l, 1000) >= 0);
    struct late_write w = { p->fd[1], 300, writer_cpu };
    pthread_t t;
    pthread_attr_t a;
    struct sched_param normal = { 0 };
    pthread_attr_init(&a);          /* not the caller's CPU and policy */
    pthread_attr_setinheritsched(&a, PTHREAD_EXPLICIT_SCHED);
    pthread_attr_setschedpolicy(&a, SCHED_OTHER);
    pthread_attr_setschedparam(&a, &normal);
    if (writer_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(writer_cpu, &set);
        pthread_attr_setaffinity_np(&a, sizeof set, &set);
    }
    assert_int_equal(pthread_create(&t, &a, late_write_thread, &w), 0);
    pthread_attr_destroy(&a);
    long s0 = thread_sleeps();
    while (p->got == before + 1)
        assert_true(vd_loop_run_once(p->l, 1000) >= 0);
    long s1 = thread_sleeps();
    pthread_join(t, NULL);
    return s1 != s0;
}

static void poll_after_events(void **s)
{
    struct pipe_loop p;
    pipe_loop_open(&p);

    /* polling off: every wait for the late event is a sleep (allow a
     * few exceptions: a preempted loop may find the byte already there) */
    vd_loop_set_poll(p.l, 0);
    int slept = 0;
    for (int i = 0; i < 20; i++)
        slept += slept_for_next(&p, -1);
    assert_true(slept >= 15);

    /* polling on: the loop catches the next event without sleeping. On a
     * busy machine it would rightly sleep (another thread shares its CPU):
     * as root the loop's thread runs first on its CPU (SCHED_FIFO), the
     * writer on another, and one caught event in 50 tries is the proof. */
    cpu_set_t old;
    assert_int_equal(pthread_getaffinity_np(pthread_self(), sizeof old, &old), 0);
    int cpu = sched_getcpu(), other = other_cpu(&old, cpu);
    assert_true(other >= 0);        /* needs two CPUs */
    pin_self(cpu);
    struct sched_param fifo = { .sched_priority = 1 }, normal = { 0 };
    bool rt = pthread_setschedparam(pthread_self(), SCHED_FIFO, &fifo) == 0;
    vd_loop_set_poll(p.l, 5000000);
    int caught = 0;
    for (int i = 0; i < 50 && !caught; i++)
        caught += !slept_for_next(&p, other);
    if (rt)
        pthread_setschedparam(pthread_self(), SCHED_OTHER, &normal);
    assert_int_equal(pthread_setaffinity_np(pthread_self(), sizeof old, &old), 0);
    assert_true(caught);
    pipe_loop_close(&p);
}

struct hog {
    int cpu;
    atomic_bool stop;
};

static void *hog_thread(void *arg)
{
    struct hog *h = arg;
    pin_self(h->cpu);
    while (!atomic_load_explicit(&h->stop, memory_order_relaxed))
        ;
    return NULL;
}

/* A thread that never sleeps shares the loop's CPU: the loop must sleep
 * for events instead of polling, which would take the CPU from it. */
static void poll_yields_shared_cpu(void **s)
{
    cpu_set_t old;
    assert_int_equal(pthread_getaffinity_np(pthread_self(), sizeof old, &old), 0);
    int cpu = sched_getcpu();
    assert_true(cpu >= 0);
    pin_self(cpu);
    int other = other_cpu(&old, cpu);
    struct hog h = { .cpu = cpu };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, hog_thread, &h), 0);

    struct pipe_loop p;
    pipe_loop_open(&p);
    /* The loop's CPU time over 300 ms of events 300 us apart, with
     * polling off (the cost of the events themselves: a thread made per
     * event, the wake-ups) and on: polling through the waits would take
     * its fair half of the CPU from the hog. (Counting the sleeps instead
     * would mislead: a poll that catches its event is over in 300 us, a
     * wake-up on the hog's CPU can wait a whole time slice.) */
    long used[2];
    uint64_t wall[2];
    for (int on = 0; on < 2; on++) {
        vd_loop_set_poll(p.l, on ? 5000000 : 0);
        uint64_t t0 = ms_now();
        long c0 = thread_cpu_us();
        while (ms_now() < t0 + 300)
            slept_for_next(&p, other);
        used[on] = thread_cpu_us() - c0;
        wall[on] = (ms_now() - t0) * 1000;
    }
    atomic_store(&h.stop, true);
    pthread_join(t, NULL);
    print_message("loop used %ld us of CPU in %lu us without polling, %ld us in %lu us with\n",
                  used[0], (unsigned long)wall[0], used[1], (unsigned long)wall[1]);
    /* polling regardless: ~1/2 of the time more */
    assert_true((used[1] - used[0]) * 5 < (long)wall[1]);
    pipe_loop_close(&p);
    assert_int_equal(pthread_setaffinity_np(pthread_self(), sizeof old, &old), 0);
}

struct poll_stop_ctx {
    atomic_int state;       /* 1: running with I/O in flight, 2: vd_loop_run returned */
    struct vd_loop *loop;
    struct pio p;
};

static void *poll_stop_thread(void *arg)
{
    struct poll_stop_ctx *c = arg;
    assert_int_equal(vd_loop_new(VD_AIO_IO_URING, &c->loop), 0);
    vd_loop_set_poll(c->loop, VD_LOOP_POLL_MAX_NS);
    pio_start(c->loop, &c->p);
    atomic_store(&c->state, 1);
    vd_loop_run(c->loop);
    atomic_store(&c->state, 2);
    write_x(&c->p);
    for (int i = 0; i < 1000 && !c->p.done; i++)
        vd_loop_run_once(c->loop, 1000);
    pio_end(&c->p);
    vd_loop_free(c->loop);
    return NULL;
}

static void poll_stop(void **s)
{
    struct poll_stop_ctx c = { 0 };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, poll_stop_thread, &c), 0);
    while (atomic_load(&c.state) == 0)
        usleep(1000);
    usleep(20000);
    assert_int_equal(atomic_load(&c.state), 1);
    vd_loop_stop(c.loop);
    pthread_join(t, NULL);
    assert_int_equal(atomic_load(&c.state), 2);
    assert_true(c.p.done);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(post_threads),
        cmocka_unit_test(post_node_threads),
        cmocka_unit_test(stop_thread),
        cmocka_unit_test(timers),
        cmocka_unit_test(timer_rearm),
        cmocka_unit_test(offload),
        cmocka_unit_test(offload_after_fork),
        cmocka_unit_test(fd_watch),
        cmocka_unit_test(fd_del_in_callback),
        cmocka_unit_test(nested),
        cmocka_unit_test(current),
        cmocka_unit_test(poll_settings),
        cmocka_unit_test(poll_delivers),
        cmocka_unit_test(poll_stop),
        cmocka_unit_test(poll_after_events),
        cmocka_unit_test(poll_yields_shared_cpu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
