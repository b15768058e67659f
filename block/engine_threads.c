/* Thread-pool engine, for hosts where neither io_uring nor Linux AIO can be
 * used: a few workers per loop do preadv / pwritev / fdatasync (resuming
 * short transfers themselves) and hand finished requests back through a
 * completion list and an eventfd. Requests are linked through io->next, so
 * nothing is allocated per request. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include "vdisk/engine.h"
#include "block/engine_int.h"

#define MAX_WORKERS 4

struct list {
    struct vd_io *head, *tail;
};

static void list_add(struct list *l, struct vd_io *io)
{
    io->next = NULL;
    if (l->tail)
        l->tail->next = io;
    else
        l->head = io;
    l->tail = io;
}

struct tpool {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct list local;      /* submitted on the loop thread, not yet flushed */
    struct list todo;       /* for the workers */
    struct list done;       /* finished; result in io->cur_iovcnt */
    unsigned ntodo, nidle, nstarting, nthreads;
    bool stop;
    int efd;
    unsigned pending;       /* submitted, not yet reaped (loop thread only) */
    pthread_t threads[MAX_WORKERS];
};

static int t_init(struct vd_engine **out, unsigned depth)
{
    struct tpool *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (t->efd < 0) {
        int r = -errno;
        free(t);
        return r;
    }
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->cond, NULL);
    *out = (struct vd_engine *)t;
    return 0;
}

static void t_fini(struct vd_engine *e)
{
    struct tpool *t = (struct tpool *)e;
    if (!t)
        return;
    pthread_mutex_lock(&t->lock);
    t->stop = true;
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
    for (unsigned i = 0; i < t->nthreads; i++)
        pthread_join(t->threads[i], NULL);
    pthread_mutex_destroy(&t->lock);
    pthread_cond_destroy(&t->cond);
    close(t->efd);
    free(t);
}

static int t_event_fd(struct vd_engine *e)
{
    return ((struct tpool *)e)->efd;
}

/* Called with t->lock held. */
static void finish_locked(struct tpool *t, struct vd_io *io, int res)
{
    bool wake = !t->done.head;
    io->cur_iovcnt = res;
    list_add(&t->done, io);
    if (wake) {
        uint64_t one = 1;
        while (write(t->efd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
}

static void *worker(void *arg)
{
    struct tpool *t = arg;
    pthread_mutex_lock(&t->lock);
    t->nstarting--;
    for (;;) {
        while (!t->todo.head && !t->stop) {
            t->nidle++;
            pthread_cond_wait(&t->cond, &t->lock);
            t->nidle--;
        }
        if (!t->todo.head)
            break;
        struct vd_io *io = t->todo.head;
        t->todo.head = io->next;
        if (!t->todo.head)
            t->todo.tail = NULL;
        t->ntodo--;
        pthread_mutex_unlock(&t->lock);
        int res = vd_io_run_sync(io);
        pthread_mutex_lock(&t->lock);
        finish_locked(t, io, res);
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

static void t_submit(struct vd_engine *e, struct vd_io *io)
{
    struct tpool *t = (struct tpool *)e;
    vd_io_begin(io);
    t->pending++;
    list_add(&t->local, io);
}

static void t_flush(struct vd_engine *e)
{
    struct tpool *t = (struct tpool *)e;
    if (!t->local.head)
        return;
    unsigned n = 0;
    for (struct vd_io *io = t->local.head; io; io = io->next)
        n++;
    pthread_mutex_lock(&t->lock);
    if (t->todo.tail)
        t->todo.tail->next = t->local.head;
    else
        t->todo.head = t->local.head;
    t->todo.tail = t->local.tail;
    t->local.head = t->local.tail = NULL;
    t->ntodo += n;
    /* Grow the pool while there is more queued work than idle workers. */
    while (t->ntodo > t->nidle + t->nstarting && t->nthreads < MAX_WORKERS) {
        if (pthread_create(&t->threads[t->nthreads], NULL, worker, t) != 0)
            break;
        t->nthreads++;
        t->nstarting++;
    }
    if (t->nthreads == 0) {
        /* No worker could be started: do the work here. */
        while (t->todo.head) {
            struct vd_io *io = t->todo.head;
            t->todo.head = io->next;
            t->ntodo--;
            finish_locked(t, io, vd_io_run_sync(io));
        }
        t->todo.tail = NULL;
    }
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

static int t_reap(struct vd_engine *e)
{
    struct tpool *t = (struct tpool *)e;
    uint64_t cnt;
    int done = 0;
    if (read(t->efd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
        return -errno;
    pthread_mutex_lock(&t->lock);
    struct vd_io *io = t->done.head;
    t->done.head = t->done.tail = NULL;
    pthread_mutex_unlock(&t->lock);
    while (io) {
        struct vd_io *next = io->next;
        io->next = NULL;
        t->pending--;
        vd_io_complete(io, io->cur_iovcnt);
        done++;
        io = next;
    }
    return done;
}

static bool t_busy(struct vd_engine *e)
{
    return ((struct tpool *)e)->pending > 0;
}

const struct vd_engine_ops vd_engine_threads = {
    .name = "threads",
    .init = t_init,
    .fini = t_fini,
    .event_fd = t_event_fd,
    .submit = t_submit,
    .flush = t_flush,
    .reap = t_reap,
    .busy = t_busy,
};
