/* The control socket server: newline-delimited JSON requests on a Unix
 * socket, answered in order; events are broadcast to every client. Runs
 * on one loop (the daemon's main loop, which also accepts NBD connections).
 * Commands registered as blocking (they open, drain, flush or resize disks:
 * a cluster round trip each on RBD, or the RBD timeout when an OSD is
 * dead) run one at a time on the server's command thread instead, so the
 * loop goes on serving; the client that sent one waits for its reply
 * before its next request is read. A client's input line and its unsent
 * output are bounded; one that exceeds them is dropped. Closing answers
 * every request still pending, run or not (docs/control.md, Shutdown). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "vdisk/control.h"
#include "vdisk/error.h"
#include "vdisk/export.h"

#define MAX_LINE    (1u << 20)
#define MAX_OUT     (8u << 20)
#define MAX_CMDS    64

struct cmd {
    const char *name;
    vd_control_fn fn;
    bool blocking;
};
static struct cmd cmds[MAX_CMDS];
static size_t ncmds;
static pthread_mutex_t cmd_lock = PTHREAD_MUTEX_INITIALIZER;

struct client {
    struct vd_control *srv;
    uint64_t id;                /* names the client to the command thread */
    bool waiting;               /* a blocking command of its own is running */
    size_t in_scan;             /* bytes of in already searched for a newline */
    int fd;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_len, out_cap;
    uint32_t events;
    struct client *next;
};

struct ev_job {
    struct vd_control *srv;
    char *text;
    struct ev_job *next;
};

/* A blocking command for the command thread, and then its reply. */
struct job {
    uint64_t client;
    json_t *req;
    char *reply;                /* JSON text */
    struct ev_job *evs, **evs_tail;     /* its events, sent after the reply */
    struct job *next;
};
/* The job the command thread is running (its events wait for its reply). */
static __thread struct job *tl_job;

struct vd_control {
    struct vd_loop *loop;
    int lfd;
    char *path;
    struct client *clients;
    uint64_t next_id;
    /* the command thread: todo → run → done, under jlock */
    pthread_t thread;
    bool thread_started, stopping;
    bool closing;               /* vd_control_close has begun (loop thread only) */
    pthread_mutex_t jlock;
    pthread_cond_t jcond;
    struct job *todo, **todo_tail;
    struct job *done, **done_tail;
};

static pthread_mutex_t srv_lock = PTHREAD_MUTEX_INITIALIZER;
static struct vd_control *the_server;   /* for events */

static void register_cmd(const char *name, vd_control_fn fn, bool blocking)
{
    pthread_mutex_lock(&cmd_lock);
    size_t i;
    for (i = 0; i < ncmds && strcmp(cmds[i].name, name); i++)
        ;
    if (i < MAX_CMDS) {
        cmds[i] = (struct cmd){ name, fn, blocking };
        if (i == ncmds)
            ncmds++;
    }
    pthread_mutex_unlock(&cmd_lock);
}

void vd_control_register(const char *name, vd_control_fn fn)
{
    register_cmd(name, fn, false);
}

void vd_control_register_blocking(const char *name, vd_control_fn fn)
{
    register_cmd(name, fn, true);
}

static vd_control_fn find_cmd(const char *name, bool *blocking)
{
    vd_control_fn fn = NULL;
    pthread_mutex_lock(&cmd_lock);
    for (size_t i = 0; i < ncmds; i++)
        if (!strcmp(cmds[i].name, name)) {
            fn = cmds[i].fn;
            if (blocking)
                *blocking = cmds[i].blocking;
        }
    pthread_mutex_unlock(&cmd_lock);
    return fn;
}

static json_t *error_reply(const char *cls, const char *desc)
{
    return json_pack("{s:{s:s,s:s}}", "error", "class", cls, "desc", desc);
}

static const char *err_class(int r)
{
    switch (r) {
    case -ENOENT: return "NotFound";
    case -EEXIST: return "AlreadyExists";
    case -EBUSY: return "Busy";
    case -EINVAL: return "InvalidParameter";
    case -EAGAIN: return "Locked";
    default: return "GenericError";
    }
}

/* The answer to a request that will not run because the server is closing:
 * an error naming the command, with the request's id. */
static json_t *shutdown_reply(json_t *req)
{
    json_t *exe = json_object_get(req, "execute");
    char msg[300];
    snprintf(msg, sizeof msg, "vdiskd is shutting down: %.200s was not run",
             json_is_string(exe) ? json_string_value(exe) : "the command");
    json_t *reply = error_reply("GenericError", msg);
    json_t *id = json_object_get(req, "id");
    if (reply && id)
        json_object_set(reply, "id", id);
    return reply;
}

json_t *vd_control_execute(json_t *req)
{
    json_t *reply;
    if (!json_is_object(req))
        return error_reply("InvalidRequest", "a request must be a JSON object");
    json_t *exe = json_object_get(req, "execute");
    json_t *args = json_object_get(req, "arguments");
    if (!json_is_string(exe))
        reply = error_reply("InvalidRequest", "missing \"execute\" (a command name)");
    else if (args && !json_is_object(args))
        reply = error_reply("InvalidRequest", "\"arguments\" must be an object");
    else {
        vd_control_fn fn = find_cmd(json_string_value(exe), NULL);
        if (!fn) {
            char msg[300];
            snprintf(msg, sizeof msg, "unknown command '%.200s'", json_string_value(exe));
            reply = error_reply("CommandNotFound", msg);
        } else {
            json_t *empty = NULL;
            if (!args)
                args = empty = json_object();
            json_t *ret = NULL;
            vd_err_clear();
            int r = fn(args, &ret);
            json_decref(empty);
            if (r < 0) {
                reply = error_reply(err_class(r), vd_errmsg(r));
                json_decref(ret);
            } else {
                reply = json_object();
                json_object_set_new(reply, "return", ret ? ret : json_object());
            }
        }
    }
    json_t *id = json_object_get(req, "id");
    if (id)
        json_object_set(reply, "id", id);
    return reply;
}

/* ---- clients ---- */

static void client_free(struct client *cl)
{
    struct vd_control *s = cl->srv;
    for (struct client **pp = &s->clients; *pp; pp = &(*pp)->next)
        if (*pp == cl) {
            *pp = cl->next;
            break;
        }
    vd_loop_del_fd(s->loop, cl->fd);
    close(cl->fd);
    free(cl->in);
    free(cl->out);
    free(cl);
}

static int client_queue(struct client *cl, const char *s, size_t n)
{
    if (cl->out_len + n + 1 > MAX_OUT)
        return -ENOBUFS;
    if (cl->out_len + n + 1 > cl->out_cap) {
        size_t cap = cl->out_cap ? cl->out_cap : 4096;
        while (cap < cl->out_len + n + 1)
            cap *= 2;
        char *p = realloc(cl->out, cap);
        if (!p)
            return -ENOMEM;
        cl->out = p;
        cl->out_cap = cap;
    }
    memcpy(cl->out + cl->out_len, s, n);
    cl->out[cl->out_len + n] = '\n';
    cl->out_len += n + 1;
    return 0;
}

static int client_send_json(struct client *cl, json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT);
    if (!s)
        return -ENOMEM;
    int r = client_queue(cl, s, strlen(s));
    free(s);
    return r;
}

/* Returns -1 when the client is gone. */
static int client_flush(struct client *cl)
{
    while (cl->out_len) {
        ssize_t n = send(cl->fd, cl->out, cl->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -1;
        }
        memmove(cl->out, cl->out + n, cl->out_len - (size_t)n);
        cl->out_len -= (size_t)n;
    }
    /* a client waiting for a blocking command's reply sends nothing more
     * for now (its input stays in the socket) */
    uint32_t ev = (cl->waiting ? 0 : EPOLLIN) | (cl->out_len ? EPOLLOUT : 0);
    if (ev != cl->events) {
        vd_loop_mod_fd(cl->srv->loop, cl->fd, ev);
        cl->events = ev;
    }
    return 0;
}

static int job_queue(struct client *cl, json_t *req);

static void handle_line(struct client *cl, char *line, size_t len)
{
    while (len && (line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t'))
        len--;
    if (!len)
        return;
    json_error_t jerr;
    json_t *req = json_loadb(line, len, 0, &jerr);
    json_t *reply;
    if (!req) {
        char msg[300];
        snprintf(msg, sizeof msg, "JSON parse error: %s", jerr.text);
        reply = error_reply("InvalidRequest", msg);
    } else if (cl->srv->closing && json_is_object(req) &&
               json_is_string(json_object_get(req, "execute"))) {
        reply = shutdown_reply(req);    /* nothing new runs once closing */
        json_decref(req);
    } else {
        json_t *exe = json_object_get(req, "execute");
        bool blocking = false;
        if (json_is_string(exe) && find_cmd(json_string_value(exe), &blocking) && blocking &&
            job_queue(cl, req) == 0) {
            cl->waiting = true;     /* deliver() answers and reads on */
            return;
        }
        reply = vd_control_execute(req);
        json_decref(req);
    }
    client_send_json(cl, reply);
    json_decref(reply);
}

/* Answer the complete lines in the input, stopping after one that went to
 * the command thread. */
static void client_lines(struct client *cl)
{
    size_t start = 0, i = cl->in_scan;
    for (; i < cl->in_len && !cl->waiting; i++)
        if (cl->in[i] == '\n') {
            handle_line(cl, cl->in + start, i - start);
            start = i + 1;
        }
    memmove(cl->in, cl->in + start, cl->in_len - start);
    cl->in_len -= start;
    cl->in_scan = i - start;
}

static void client_event(struct vd_loop *loop, int fd, uint32_t events, void *opaque)
{
    struct client *cl = opaque;
    if (cl->waiting && (events & (EPOLLHUP | EPOLLERR))) {
        client_free(cl);            /* gone: its reply will find nobody */
        return;
    }
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !cl->waiting) {
        for (;;) {
            if (cl->in_cap - cl->in_len < 4096) {
                if (cl->in_cap >= MAX_LINE + 4096) {
                    client_send_json(cl, error_reply("InvalidRequest", "request line too long"));
                    client_flush(cl);
                    client_free(cl);
                    return;
                }
                size_t cap = cl->in_cap ? cl->in_cap * 2 : 8192;
                char *p = realloc(cl->in, cap);
                if (!p) {
                    client_free(cl);
                    return;
                }
                cl->in = p;
                cl->in_cap = cap;
            }
            ssize_t n = recv(fd, cl->in + cl->in_len, cl->in_cap - cl->in_len, MSG_DONTWAIT);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (n <= 0) {
                /* The client stopped sending; it may still read the replies. */
                client_flush(cl);
                client_free(cl);
                return;
            }
            cl->in_len += (size_t)n;
            client_lines(cl);
            if (cl->in_len > MAX_LINE) {
                client_send_json(cl, error_reply("InvalidRequest", "request line too long"));
                client_flush(cl);
                client_free(cl);
                return;
            }
            if (cl->waiting)
                break;              /* the rest waits in the socket */
        }
    }
    if (client_flush(cl) < 0)
        client_free(cl);
}

/* ---- the command thread ---- */

static void *cmd_thread(void *opaque);
static void deliver(void *opaque);
static void broadcast(void *opaque);

/* Hand req (consumed on success) to the command thread. */
static int job_queue(struct client *cl, json_t *req)
{
    struct vd_control *s = cl->srv;
    struct job *j = calloc(1, sizeof *j);
    if (!j)
        return -ENOMEM;
    if (!s->thread_started) {
        if (pthread_create(&s->thread, NULL, cmd_thread, s) != 0) {
            free(j);
            return -EAGAIN;         /* the caller runs it here, as it would have */
        }
        s->thread_started = true;
    }
    j->client = cl->id;
    j->req = req;
    pthread_mutex_lock(&s->jlock);
    *s->todo_tail = j;
    s->todo_tail = &j->next;
    pthread_cond_signal(&s->jcond);
    pthread_mutex_unlock(&s->jlock);
    return 0;
}

/* Blocking commands, one at a time, in the order they came; each reply goes
 * back to the loop (deliver). Once shutdown begins (vd_control_quiesce, or
 * vd_control_close), the thread starts nothing more: the commands still
 * queued are answered by vd_control_close
 * with a shutdown error at once, without running (the daemon's shutdown
 * removes every export anyway), and the one under way finishes and its
 * reply is sent before the clients are closed. */
static void *cmd_thread(void *opaque)
{
    struct vd_control *s = opaque;
    pthread_mutex_lock(&s->jlock);
    for (;;) {
        while (!s->todo && !s->stopping)
            pthread_cond_wait(&s->jcond, &s->jlock);
        if (s->stopping)
            break;
        struct job *j = s->todo;
        s->todo = j->next;
        if (!s->todo)
            s->todo_tail = &s->todo;
        pthread_mutex_unlock(&s->jlock);
        j->evs_tail = &j->evs;
        tl_job = j;
        json_t *reply = vd_control_execute(j->req);
        tl_job = NULL;
        j->reply = json_dumps(reply, JSON_COMPACT);
        json_decref(reply);
        json_decref(j->req);
        j->req = NULL;
        j->next = NULL;
        pthread_mutex_lock(&s->jlock);
        *s->done_tail = j;
        s->done_tail = &j->next;
        pthread_mutex_unlock(&s->jlock);
        vd_loop_post(s->loop, deliver, NULL);
        pthread_mutex_lock(&s->jlock);
    }
    pthread_mutex_unlock(&s->jlock);
    return NULL;
}

static void broadcast_text(struct vd_control *s, const char *text);

static void job_free(struct job *j)
{
    while (j->evs) {
        struct ev_job *e = j->evs;
        j->evs = e->next;
        free(e->text);
        free(e);
    }
    json_decref(j->req);
    free(j->reply);
    free(j);
}

/* Send the replies of the jobs listed from j (each has one, or is out of
 * memory), their events after them, and free the jobs. */
static void deliver_jobs(struct vd_control *s, struct job *j)
{
    while (j) {
        struct job *next = j->next;
        struct client *cl = s->clients;
        while (cl && cl->id != j->client)
            cl = cl->next;
        if (cl) {
            int r;
            if (j->reply)
                r = client_queue(cl, j->reply, strlen(j->reply));
            else {
                json_t *e = error_reply("GenericError", "out of memory");
                r = client_send_json(cl, e);
                json_decref(e);
            }
            cl->waiting = false;
            if (r == 0)
                client_lines(cl);   /* what it sent meanwhile */
            if (r < 0 || client_flush(cl) < 0)
                client_free(cl);
        }
        /* as a command on the loop: reply, then events */
        for (struct ev_job *e = j->evs; e; e = e->next)
            broadcast_text(s, e->text);
        job_free(j);
        j = next;
    }
}

static struct job *take_done(struct vd_control *s)
{
    pthread_mutex_lock(&s->jlock);
    struct job *j = s->done;
    s->done = NULL;
    s->done_tail = &s->done;
    pthread_mutex_unlock(&s->jlock);
    return j;
}

/* On the loop: send the replies that are ready, and let their clients go on. */
static void deliver(void *opaque)
{
    pthread_mutex_lock(&srv_lock);
    struct vd_control *s = the_server;  /* NULL once closed: close sent them */
    pthread_mutex_unlock(&srv_lock);
    if (s)
        deliver_jobs(s, take_done(s));
}

static void accept_event(struct vd_loop *loop, int fd, uint32_t events, void *opaque)
{
    struct vd_control *s = opaque;
    for (;;) {
        int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0)
            return;
        struct client *cl = calloc(1, sizeof *cl);
        if (!cl) {
            close(cfd);
            continue;
        }
        cl->srv = s;
        cl->id = ++s->next_id;
        cl->fd = cfd;
        cl->events = EPOLLIN;
        if (vd_loop_add_fd(loop, cfd, EPOLLIN, client_event, cl) < 0) {
            close(cfd);
            free(cl);
            continue;
        }
        cl->next = s->clients;
        s->clients = cl;
        json_t *g = json_pack("{s:{s:s,s:s,s:[]}}", "greeting", "program", "vdiskd", "version",
                              VDISK_VERSION, "capabilities");
        client_send_json(cl, g);
        json_decref(g);
        if (client_flush(cl) < 0)
            client_free(cl);
    }
}

int vd_control_open(struct vd_loop *loop, const char *path, int fd, struct vd_control **out)
{
    struct vd_control *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    s->loop = loop;
    s->lfd = fd;
    pthread_mutex_init(&s->jlock, NULL);
    pthread_cond_init(&s->jcond, NULL);
    s->todo_tail = &s->todo;
    s->done_tail = &s->done;
    if (fd < 0) {
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof a.sun_path) {
            free(s);
            return vd_err(-ENAMETOOLONG, "%s: control socket path too long", path);
        }
        strcpy(a.sun_path, path);
        s->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (s->lfd < 0) {
            free(s);
            return vd_err(-errno, "socket: %s", strerror(errno));
        }
        /* A stale socket from a previous run is replaced; a live one is not. */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof a) == 0) {
            close(probe);
            close(s->lfd);
            free(s);
            return vd_err(-EADDRINUSE, "%s: another daemon is listening there", path);
        }
        if (probe >= 0)
            close(probe);
        unlink(path);
        if (bind(s->lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(s->lfd, 16) < 0) {
            int e = errno;
            close(s->lfd);
            free(s);
            return vd_err(-e, "%s: %s", path, strerror(e));
        }
        chmod(path, 0600);
        s->path = strdup(path);
    } else {
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    }
    int r = vd_loop_add_fd(loop, s->lfd, EPOLLIN, accept_event, s);
    if (r < 0) {
        close(s->lfd);
        if (s->path)
            unlink(s->path);
        free(s->path);
        free(s);
        return r;
    }
    pthread_mutex_lock(&srv_lock);
    the_server = s;
    pthread_mutex_unlock(&srv_lock);
    *out = s;
    return 0;
}

/* Closing: give the clients up to a second in all to take what they were
 * sent (a client that does not read must not hold up the shutdown). */
static void flush_before_close(struct vd_control *s)
{
    struct timespec end, now;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += 1;
    for (struct client *cl = s->clients; cl; cl = cl->next) {
        while (cl->out_len) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long ms = (end.tv_sec - now.tv_sec) * 1000 + (end.tv_nsec - now.tv_nsec) / 1000000;
            if (ms <= 0)
                return;
            struct pollfd p = { .fd = cl->fd, .events = POLLOUT };
            int n = poll(&p, 1, (int)ms);
            if (n < 0 && errno != EINTR)
                break;
            if (n > 0 && client_flush(cl) < 0)
                break;              /* gone */
        }
    }
}

void vd_control_quiesce(struct vd_control *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->jlock);
    s->stopping = true;             /* cmd_thread ends after the job under way */
    pthread_cond_signal(&s->jcond);
    pthread_mutex_unlock(&s->jlock);
}

/* Every request gets exactly one reply, shutdown or not: the commands still
 * queued are answered with an error (not run), the one under way finishes
 * and is answered, and what the clients sent meanwhile, or send until the
 * socket closes, is answered with an error too. */
void vd_control_close(struct vd_control *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&srv_lock);
    if (the_server == s)
        the_server = NULL;
    pthread_mutex_unlock(&srv_lock);
    s->closing = true;              /* handle_line runs nothing more */
    pthread_mutex_lock(&s->jlock);
    s->stopping = true;
    struct job *todo = s->todo;
    s->todo = NULL;
    s->todo_tail = &s->todo;
    pthread_cond_signal(&s->jcond);
    pthread_mutex_unlock(&s->jlock);
    /* The queued commands' clients are answered now, not after the one
     * under way (which may wait long for its disk). */
    for (struct job *j = todo; j; j = j->next) {
        json_t *e = shutdown_reply(j->req);
        j->reply = e ? json_dumps(e, JSON_COMPACT) : NULL;
        json_decref(e);
    }
    deliver_jobs(s, todo);
    if (s->thread_started) {
        /* a command under way finishes first (an export-del its flush), as
         * the daemon's removal of every export would wait for it anyway */
        pthread_join(s->thread, NULL);
    }
    deliver_jobs(s, take_done(s));
    /* Clients that connected meanwhile, and the requests still in the
     * sockets: answered (with errors) before the sockets close. */
    accept_event(s->loop, s->lfd, EPOLLIN, s);
    for (struct client *cl = s->clients, *next; cl; cl = next) {
        next = cl->next;
        client_event(s->loop, cl->fd, EPOLLIN, cl);    /* may free cl */
    }
    flush_before_close(s);
    pthread_mutex_destroy(&s->jlock);
    pthread_cond_destroy(&s->jcond);
    while (s->clients)
        client_free(s->clients);
    vd_loop_del_fd(s->loop, s->lfd);
    close(s->lfd);
    if (s->path)
        unlink(s->path);
    free(s->path);
    free(s);
}


static void broadcast_text(struct vd_control *s, const char *text)
{
    for (struct client *cl = s->clients, *next; cl; cl = next) {
        next = cl->next;
        if (client_queue(cl, text, strlen(text)) < 0 || client_flush(cl) < 0)
            client_free(cl);
    }
}

static void broadcast(void *opaque)
{
    struct ev_job *j = opaque;
    pthread_mutex_lock(&srv_lock);
    struct vd_control *s = the_server;
    pthread_mutex_unlock(&srv_lock);
    if (s == j->srv)
        broadcast_text(s, j->text);
    free(j->text);
    free(j);
}

void vd_control_event(const char *name, json_t *data)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    json_t *ev = json_pack("{s:s,s:o,s:{s:I,s:I}}", "event", name, "data", data ? data : json_object(),
                           "timestamp", "seconds", (json_int_t)tv.tv_sec, "microseconds",
                           (json_int_t)tv.tv_usec);
    if (!ev)
        return;
    char *text = json_dumps(ev, JSON_COMPACT);
    json_decref(ev);
    if (tl_job) {
        struct ev_job *j = text ? calloc(1, sizeof *j) : NULL;
        if (!j) {
            free(text);
            return;
        }
        j->text = text;
        *tl_job->evs_tail = j;
        tl_job->evs_tail = &j->next;
        return;
    }
    pthread_mutex_lock(&srv_lock);
    struct vd_control *s = the_server;
    struct ev_job *j = s && text ? malloc(sizeof *j) : NULL;
    if (j) {
        j->srv = s;
        j->text = text;
        vd_loop_post(s->loop, broadcast, j);
    } else {
        free(text);
    }
    pthread_mutex_unlock(&srv_lock);
}
