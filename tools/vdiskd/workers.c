/* Worker threads: one event loop each. Connections are handed to them
 * round-robin; a connection and its requests stay on one loop. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "vdiskd.h"
#include "vdisk/error.h"
#include "vdisk/export.h"

struct worker {
    pthread_t tid;
    struct vd_loop *loop;
    int err;
    pthread_mutex_t lock;
    pthread_cond_t ready;
    bool started;
};

static struct worker *workers;
static unsigned nworkers;
static atomic_uint next_worker;

static void *worker_main(void *opaque)
{
    struct worker *w = opaque;
    struct vd_loop *loop = NULL;
    int r = vd_loop_new(VD_AIO_DEFAULT, &loop);
    pthread_mutex_lock(&w->lock);
    w->err = r;
    w->loop = loop;
    w->started = true;
    pthread_cond_signal(&w->ready);
    pthread_mutex_unlock(&w->lock);
    if (r < 0)
        return NULL;
    vd_loop_run(loop);
    return NULL;
}

int vdd_workers_start(unsigned n)
{
    workers = calloc(n, sizeof *workers);
    if (!workers)
        return -ENOMEM;
    for (unsigned i = 0; i < n; i++) {
        struct worker *w = &workers[i];
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->ready, NULL);
        int r = pthread_create(&w->tid, NULL, worker_main, w);
        if (r) {
            vdd_workers_stop();
            return vd_err(-r, "cannot start a worker thread");
        }
        nworkers++;
        pthread_mutex_lock(&w->lock);
        while (!w->started)
            pthread_cond_wait(&w->ready, &w->lock);
        pthread_mutex_unlock(&w->lock);
        if (w->err < 0) {
            int e = w->err;
            vdd_workers_stop();
            return vd_err(e, "cannot create an event loop: %s", vd_errmsg(e));
        }
    }
    vd_log(VD_LOG_DEBUG, "%u worker thread(s), I/O engine %s", n,
           workers[0].loop ? vd_loop_engine_name(workers[0].loop) : "?");
    return 0;
}

struct vd_loop *vdd_worker_next(void)
{
    unsigned i = atomic_fetch_add(&next_worker, 1) % nworkers;
    return workers[i].loop;
}

void vdd_workers_stop(void)
{
    for (unsigned i = 0; i < nworkers; i++)
        if (workers[i].loop)
            vd_loop_stop(workers[i].loop);
    for (unsigned i = 0; i < nworkers; i++) {
        pthread_join(workers[i].tid, NULL);
        if (workers[i].loop)
            vd_loop_free(workers[i].loop);
    }
    free(workers);
    workers = NULL;
    nworkers = 0;
}
