/* The shared worker pool is elastic: jobs blocked in their worker (a
 * stalled RBD/NBD round trip) must not starve other jobs, the pool must not
 * grow past its cap, and it shrinks back to its base size once idle.
 * Blocked jobs here wait on a condition variable, as a worker waits on a
 * socket. Runs with VDISK_WORKERS=2 and VDISK_WORKERS_IDLE_MS=300. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "vdisk/loop.h"

#define BASE 2
#define CAP 64              /* POOL_MAX in block/loop.c */

static uint64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Threads of this process (the pool's workers and monitor among them). */
static int nthreads(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    if (!d)
        return -1;
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* ---- blockers: jobs that hold their worker until released ---- */

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static bool gate_open;
static atomic_int blocked_now;      /* blockers inside their job */
static int blockers_left;           /* blockers whose done has not run */
static int baseline = -1;           /* threads with the pool at base size */

static void block_run(void *opaque)
{
    (void)opaque;
    atomic_fetch_add(&blocked_now, 1);
    pthread_mutex_lock(&gate_lock);
    while (!gate_open)
        pthread_cond_wait(&gate_cond, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
    atomic_fetch_sub(&blocked_now, 1);
}

static void block_done(void *opaque)
{
    (void)opaque;
    blockers_left--;
}

static void gate_set(bool open)
{
    pthread_mutex_lock(&gate_lock);
    gate_open = open;
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

static void start_blockers(struct vd_loop *l, int n)
{
    for (int i = 0; i < n; i++) {
        blockers_left++;
        vd_loop_offload(l, block_run, block_done, NULL);
    }
}

/* Release every blocker and wait for their done callbacks. */
static void release_blockers(struct vd_loop *l)
{
    gate_set(true);
    uint64_t end = ms_now() + 10000;
    while (blockers_left > 0 && ms_now() < end)
        vd_loop_run_once(l, 100);
    assert_int_equal(blockers_left, 0);
    gate_set(false);
}

static void wait_blocked(int n, int ms)
{
    uint64_t end = ms_now() + ms;
    while (atomic_load(&blocked_now) < n && ms_now() < end)
        usleep(1000);
}

/* ---- quick jobs ---- */

static void quick_run(void *opaque)
{
    atomic_store((atomic_int *)opaque, 1);
}

static void quick_done(void *opaque)
{
    (void)opaque;
}

/* Offload a quick job; true when it ran within 5 s. */
static bool quick_job(struct vd_loop *l)
{
    static atomic_int ran;
    atomic_store(&ran, 0);
    vd_loop_offload(l, quick_run, quick_done, &ran);
    uint64_t end = ms_now() + 5000;
    while (!atomic_load(&ran) && ms_now() < end)
        vd_loop_run_once(l, 10);
    return atomic_load(&ran);
}

/* ---- tests ---- */

static void quick_job_passes_blocked_workers(void **s)
{
    (void)s;
    struct vd_loop *l;
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
    assert_true(quick_job(l));          /* starts the pool */
    baseline = nthreads();
    assert_true(baseline > 0);

    /* every base worker blocked: the quick job still runs */
    start_blockers(l, BASE);
    wait_blocked(BASE, 5000);
    assert_int_equal(atomic_load(&blocked_now), BASE);
    bool ran = quick_job(l);
    int grown = nthreads();
    /* a stalled disk may block several more workers, one at a time */
    for (int i = 0; i < 3 && ran; i++) {
        start_blockers(l, 1);
        wait_blocked(BASE + 1 + i, 5000);
        ran = quick_job(l);
    }
    int blocked = atomic_load(&blocked_now);
    release_blockers(l);
    assert_true(ran);
    assert_int_equal(blocked, BASE + 3);
    assert_true(grown > baseline);
    vd_loop_free(l);
}

/* Extra workers exit after VDISK_WORKERS_IDLE_MS without work. */
static void pool_shrinks_back(void **s)
{
    (void)s;
    assert_true(baseline > 0);
    uint64_t end = ms_now() + 10000;
    while (nthreads() > baseline && ms_now() < end)
        usleep(20000);
    assert_int_equal(nthreads(), baseline);
}

/* Never more than CAP workers however many jobs block; a fork() child
 * of a grown pool starts a pool of its own; the pool shrinks again. */
static void pool_capped_and_forks(void **s)
{
    (void)s;
    struct vd_loop *l;
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &l), 0);
    start_blockers(l, CAP + 6);
    wait_blocked(CAP, 20000);
    usleep(200000);                 /* time to overshoot, were it to */
    assert_int_equal(atomic_load(&blocked_now), CAP);
    assert_true(nthreads() <= baseline - BASE + CAP);

    pid_t pid = fork();
    if (pid == 0) {
        struct vd_loop *cl;
        if (vd_loop_new(VD_AIO_DEFAULT, &cl) < 0)
            _exit(2);
        _exit(quick_job(cl) ? 0 : 1);
    }
    int st = 0;
    for (int i = 0; i < 200 && waitpid(pid, &st, WNOHANG) == 0; i++)
        usleep(50000);
    if (waitpid(pid, &st, WNOHANG) == 0) {     /* stuck: fail, do not hang */
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
    }
    release_blockers(l);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    vd_loop_free(l);
    pool_shrinks_back(s);
}

int main(void)
{
    setenv("VDISK_WORKERS", "2", 1);
    setenv("VDISK_WORKERS_IDLE_MS", "300", 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(quick_job_passes_blocked_workers),
        cmocka_unit_test(pool_shrinks_back),
        cmocka_unit_test(pool_capped_and_forks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
