/* The control server's command queue at shutdown (export/control.c): every
 * request gets exactly one reply. A blocking command that holds the command
 * thread (a gate this test opens) is under way while two more clients queue
 * blocking commands behind it; vd_control_close must answer the queued ones
 * with a shutdown error at once (before the running one is let go: a
 * helper thread opens the gate only after it has seen that reply), never
 * run them, then deliver the running command's own reply, and close every
 * connection after its replies. Also: a reply ready but not yet delivered
 * when the loop stopped is sent, and a server that never ran a blocking
 * command closes cleanly. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "vdisk/control.h"
#include "vdisk/loop.h"

/* A blocking command held on the command thread until the test opens its
 * gate; entered says it has started. */
struct gate {
    bool open;
    atomic_bool entered;
};

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static struct gate gate, hold, hold2;   /* one per test: commands stay registered */
static atomic_int counted;              /* how many times test-count ran */

static void gate_pass(struct gate *g)
{
    atomic_store(&g->entered, true);
    pthread_mutex_lock(&gate_lock);
    while (!g->open)
        pthread_cond_wait(&gate_cond, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
}

static void gate_release(struct gate *g)
{
    pthread_mutex_lock(&gate_lock);
    g->open = true;
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

static int cmd_gate(json_t *args, json_t **ret)
{
    gate_pass(&gate);
    *ret = json_pack("{s:b}", "gated", 1);
    return 0;
}

static int cmd_hold(json_t *args, json_t **ret)
{
    gate_pass(&hold);
    return 0;
}

static int cmd_hold2(json_t *args, json_t **ret)
{
    gate_pass(&hold2);
    return 0;
}

static int cmd_count(json_t *args, json_t **ret)
{
    atomic_fetch_add(&counted, 1);
    return 0;
}

struct srv {
    char dir[64], path[96];
    struct vd_loop *loop;
    struct vd_control *ctl;
};

static void srv_open(struct srv *s)
{
    strcpy(s->dir, "/tmp/vdisk-ctl.XXXXXX");
    assert_non_null(mkdtemp(s->dir));
    snprintf(s->path, sizeof s->path, "%s/ctl.sock", s->dir);
    assert_int_equal(vd_loop_new(VD_AIO_DEFAULT, &s->loop), 0);
    assert_int_equal(vd_control_open(s->loop, s->path, -1, &s->ctl), 0);
}

static void srv_close(struct srv *s)
{
    vd_control_close(s->ctl);
    vd_loop_free(s->loop);
    rmdir(s->dir);
}

static int connect_to(struct srv *s)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strcpy(a.sun_path, s->path);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    return fd;
}

static void send_str(int fd, const char *text)
{
    assert_int_equal(send(fd, text, strlen(text), MSG_NOSIGNAL), (ssize_t)strlen(text));
}

/* A client's side: what it has received so far, as lines. */
struct peer {
    int fd;
    char buf[8192];
    size_t len;
    bool eof;
};

/* Read what is there within ms; returns false on timeout. */
static bool peer_read(struct peer *p, int ms)
{
    struct pollfd pf = { .fd = p->fd, .events = POLLIN };
    if (poll(&pf, 1, ms) <= 0)
        return false;
    ssize_t n = recv(p->fd, p->buf + p->len, sizeof p->buf - 1 - p->len, MSG_DONTWAIT);
    if (n <= 0)
        p->eof = true;
    else
        p->len += (size_t)n;
    p->buf[p->len] = 0;
    return true;
}

/* The replies among the lines received (greeting and events left out). */
static json_t *peer_replies(struct peer *p)
{
    json_t *list = json_array();
    char *save = NULL, *copy = strdup(p->buf);
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        json_t *j = json_loads(line, 0, NULL);
        assert_non_null(j);
        if (json_object_get(j, "greeting") || json_object_get(j, "event"))
            json_decref(j);
        else
            json_array_append_new(list, j);
    }
    free(copy);
    return list;
}

static void run_loop(struct srv *s, int rounds)
{
    for (int i = 0; i < rounds; i++)
        vd_loop_run_once(s->loop, 10);
}

/* Run the loop until the gated command g is under way. */
static void run_until_entered(struct srv *s, struct gate *g)
{
    for (int i = 0; i < 500 && !atomic_load(&g->entered); i++)
        vd_loop_run_once(s->loop, 10);
    assert_true(atomic_load(&g->entered));
}

/* Run the loop until every peer has its greeting. */
static void greet(struct srv *s, struct peer *ps, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (int k = 0; k < 500 && !strchr(ps[i].buf, '\n'); k++) {
            vd_loop_run_once(s->loop, 10);
            peer_read(&ps[i], 0);
        }
        assert_non_null(strstr(ps[i].buf, "\"greeting\""));
        ps[i].len = 0;
        ps[i].buf[0] = 0;
    }
}

static void assert_shutdown_error(json_t *r, const char *cmd, json_t *id)
{
    char want[128];
    snprintf(want, sizeof want, "vdiskd is shutting down: %s was not run", cmd);
    json_t *e = json_object_get(r, "error");
    assert_non_null(e);
    assert_string_equal(json_string_value(json_object_get(e, "class")), "GenericError");
    assert_string_equal(json_string_value(json_object_get(e, "desc")), want);
    assert_true(json_equal(json_object_get(r, "id"), id));
}

struct watcher {
    struct peer *p;
    bool saw_reply_first;           /* the queued reply came while the gate was shut */
};

/* Open the gate once the queued command's reply has arrived (or after 10 s,
 * which fails the test). */
static void *watch(void *opaque)
{
    struct watcher *w = opaque;
    for (int i = 0; i < 1000 && !strchr(w->p->buf, '\n') && !w->p->eof; i++)
        peer_read(w->p, 10);
    w->saw_reply_first = strchr(w->p->buf, '\n') != NULL;
    gate_release(&gate);
    return NULL;
}

static void queued_commands_answered_at_close(void **state)
{
    vd_control_register_blocking("test-gate", cmd_gate);
    vd_control_register_blocking("test-count", cmd_count);
    struct srv s;
    srv_open(&s);
    struct peer p[3] = { { .fd = connect_to(&s) }, { .fd = connect_to(&s) }, { .fd = connect_to(&s) } };
    greet(&s, p, 3);

    send_str(p[0].fd, "{\"execute\":\"test-gate\",\"id\":1}\n");
    run_until_entered(&s, &gate);
    send_str(p[1].fd, "{\"execute\":\"test-count\",\"id\":\"two\"}\n");
    /* a second request pipelined behind the first: read only at close */
    send_str(p[2].fd, "{\"execute\":\"test-count\",\"id\":3}\n{\"execute\":\"query-version\",\"id\":[4]}\n");
    run_loop(&s, 20);
    peer_read(&p[1], 0);
    assert_int_equal(p[1].len, 0);  /* queued, no reply yet */

    struct watcher w = { .p = &p[1] };
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, watch, &w), 0);
    srv_close(&s);
    pthread_join(th, NULL);
    assert_true(w.saw_reply_first);

    for (int i = 0; i < 3; i++)
        while (!p[i].eof)
            assert_true(peer_read(&p[i], 5000));
    json_t *r0 = peer_replies(&p[0]), *r1 = peer_replies(&p[1]), *r2 = peer_replies(&p[2]);
    assert_int_equal(json_array_size(r0), 1);
    assert_true(json_is_true(json_object_get(json_object_get(json_array_get(r0, 0), "return"), "gated")));
    assert_int_equal(json_integer_value(json_object_get(json_array_get(r0, 0), "id")), 1);
    assert_int_equal(json_array_size(r1), 1);
    json_t *id = json_string("two");
    assert_shutdown_error(json_array_get(r1, 0), "test-count", id);
    json_decref(id);
    assert_int_equal(json_array_size(r2), 2);
    id = json_integer(3);
    assert_shutdown_error(json_array_get(r2, 0), "test-count", id);
    json_decref(id);
    id = json_pack("[i]", 4);
    assert_shutdown_error(json_array_get(r2, 1), "query-version", id);
    json_decref(id);
    assert_int_equal(atomic_load(&counted), 0);
    json_decref(r0);
    json_decref(r1);
    json_decref(r2);
    for (int i = 0; i < 3; i++)
        close(p[i].fd);
}

/* A blocking command that finished while the loop was not running (its
 * reply waits for the loop) still gets its reply at close. */
static void finished_reply_sent_at_close(void **state)
{
    vd_control_register_blocking("test-hold", cmd_hold);
    struct srv s;
    srv_open(&s);
    struct peer p = { .fd = connect_to(&s) };
    greet(&s, &p, 1);
    send_str(p.fd, "{\"execute\":\"test-hold\",\"id\":9}\n");
    run_until_entered(&s, &hold);
    /* the loop no longer runs: the reply the thread hands over now waits */
    gate_release(&hold);
    usleep(100 * 1000);
    srv_close(&s);
    while (!p.eof)
        assert_true(peer_read(&p, 5000));
    json_t *r = peer_replies(&p);
    assert_int_equal(json_array_size(r), 1);
    assert_non_null(json_object_get(json_array_get(r, 0), "return"));
    assert_int_equal(json_integer_value(json_object_get(json_array_get(r, 0), "id")), 9);
    json_decref(r);
    close(p.fd);
}

/* Shutdown begins while a blocking command runs and another waits behind
 * it: once quiesced, the command thread finishes the first and starts
 * nothing more, even with the loop still running; close then answers the
 * second with the shutdown error. */
static void quiesce_starts_nothing_more(void **state)
{
    vd_control_register_blocking("test-hold2", cmd_hold2);
    vd_control_register_blocking("test-count", cmd_count);
    atomic_store(&counted, 0);
    struct srv s;
    srv_open(&s);
    struct peer p[2] = { { .fd = connect_to(&s) }, { .fd = connect_to(&s) } };
    greet(&s, p, 2);
    send_str(p[0].fd, "{\"execute\":\"test-hold2\",\"id\":1}\n");
    run_until_entered(&s, &hold2);
    send_str(p[1].fd, "{\"execute\":\"test-count\",\"id\":2}\n");
    run_loop(&s, 20);               /* queued behind test-hold2 */
    vd_control_quiesce(s.ctl);
    vd_control_quiesce(s.ctl);      /* twice: harmless */
    gate_release(&hold2);
    run_loop(&s, 30);               /* 300 ms: time to start it, were it allowed */
    assert_int_equal(atomic_load(&counted), 0);
    srv_close(&s);
    for (int i = 0; i < 2; i++)
        while (!p[i].eof)
            assert_true(peer_read(&p[i], 5000));
    json_t *r0 = peer_replies(&p[0]), *r1 = peer_replies(&p[1]);
    assert_int_equal(json_array_size(r0), 1);
    assert_non_null(json_object_get(json_array_get(r0, 0), "return"));
    assert_int_equal(json_array_size(r1), 1);
    json_t *id = json_integer(2);
    assert_shutdown_error(json_array_get(r1, 0), "test-count", id);
    json_decref(id);
    assert_int_equal(atomic_load(&counted), 0);
    json_decref(r0);
    json_decref(r1);
    for (int i = 0; i < 2; i++)
        close(p[i].fd);
}

/* No blocking command ever: a request the loop had not read yet is
 * answered with the shutdown error, then the connection closes. */
static void close_without_command_thread(void **state)
{
    struct srv s;
    srv_open(&s);
    struct peer p = { .fd = connect_to(&s) };
    greet(&s, &p, 1);
    send_str(p.fd, "{\"execute\":\"query-version\",\"id\":\"v\"}\n");
    srv_close(&s);                  /* the loop has not read it: close does */
    while (!p.eof)
        assert_true(peer_read(&p, 5000));
    json_t *r = peer_replies(&p);
    assert_int_equal(json_array_size(r), 1);
    json_t *id = json_string("v");
    assert_shutdown_error(json_array_get(r, 0), "query-version", id);
    json_decref(id);
    json_decref(r);
    close(p.fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(queued_commands_answered_at_close),
        cmocka_unit_test(finished_reply_sent_at_close),
        cmocka_unit_test(close_without_command_thread),
        cmocka_unit_test(quiesce_starts_nothing_more),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
