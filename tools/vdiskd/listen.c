/* NBD listening sockets: Unix and TCP (TCP_NODELAY on accepted sockets),
 * or adopted from systemd socket activation. Accepting runs on the main
 * loop; each new connection is passed to a worker loop. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include "nbd/nbd_server.h"
#include "vdiskd.h"
#include "vdisk/error.h"
#include "vdisk/export.h"

static int add(struct vdd_listener **v, size_t *n, int fd, bool tcp, const char *desc, const char *path)
{
    struct vdd_listener *nv = realloc(*v, (*n + 1) * sizeof *nv);
    if (!nv)
        return -ENOMEM;
    *v = nv;
    nv[*n] = (struct vdd_listener){ .fd = fd, .tcp = tcp, .desc = strdup(desc),
                                    .unlink_path = path ? strdup(path) : NULL };
    (*n)++;
    return 0;
}

static int mkdir_parent(const char *path)
{
    char *d = strdup(path);
    if (!d)
        return -ENOMEM;
    char *slash = strrchr(d, '/');
    if (slash && slash != d) {
        *slash = 0;
        for (char *p = d + 1; *p; p++)
            if (*p == '/') {
                *p = 0;
                mkdir(d, 0700);
                *p = '/';
            }
        mkdir(d, 0700);
    }
    free(d);
    return 0;
}

static int listen_unix(const char *path, struct vdd_listener **v, size_t *n)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (!path[0] || strlen(path) >= sizeof a.sun_path)
        return vd_err(-EINVAL, "unix:%s: socket path empty or too long", path);
    strcpy(a.sun_path, path);
    mkdir_parent(path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return vd_err(-errno, "socket: %s", strerror(errno));
    /* Replace a stale socket file, never a live server's. */
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof a) == 0) {
        close(probe);
        close(fd);
        return vd_err(-EADDRINUSE, "unix:%s: another server is listening there", path);
    }
    if (probe >= 0)
        close(probe);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 128) < 0) {
        int e = errno;
        close(fd);
        return vd_err(-e, "unix:%s: %s", path, strerror(e));
    }
    char desc[sizeof a.sun_path + 8];
    snprintf(desc, sizeof desc, "unix:%s", path);
    int r = add(v, n, fd, false, desc, path);
    if (r < 0) {
        close(fd);
        unlink(path);
    }
    return r;
}

static int listen_tcp(const char *spec, struct vdd_listener **v, size_t *n)
{
    char host[256], port[32];
    const char *colon;
    if (spec[0] == '[') {
        const char *end = strchr(spec, ']');
        if (!end || end[1] != ':' || (size_t)(end - spec - 1) >= sizeof host)
            return vd_err(-EINVAL, "tcp:%s: expected tcp:[ADDR]:PORT", spec);
        memcpy(host, spec + 1, (size_t)(end - spec - 1));
        host[end - spec - 1] = 0;
        colon = end + 1;
    } else {
        colon = strrchr(spec, ':');
        if (!colon || (size_t)(colon - spec) >= sizeof host)
            return vd_err(-EINVAL, "tcp:%s: expected tcp:HOST:PORT", spec);
        memcpy(host, spec, (size_t)(colon - spec));
        host[colon - spec] = 0;
    }
    if (!colon[1] || strlen(colon + 1) >= sizeof port)
        return vd_err(-EINVAL, "tcp:%s: missing port", spec);
    strcpy(port, colon + 1);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *res;
    int g = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (g)
        return vd_err(-EINVAL, "tcp:%s: %s", spec, gai_strerror(g));
    int made = 0, err = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (ai->ai_family == AF_INET6)
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 128) < 0) {
            err = errno;
            close(fd);
            continue;
        }
        char h[INET6_ADDRSTRLEN + 2] = "", desc[INET6_ADDRSTRLEN + 48];
        getnameinfo(ai->ai_addr, ai->ai_addrlen, h, sizeof h, NULL, 0, NI_NUMERICHOST);
        snprintf(desc, sizeof desc, ai->ai_family == AF_INET6 ? "tcp:[%s]:%s" : "tcp:%s:%s", h, port);
        if (add(v, n, fd, true, desc, NULL) < 0) {
            close(fd);
            continue;
        }
        made++;
    }
    freeaddrinfo(res);
    if (!made)
        return vd_err(err ? -err : -EADDRNOTAVAIL, "tcp:%s: %s", spec, err ? strerror(err) : "no usable address");
    return 0;
}

int vdd_listen(const char *addr, struct vdd_listener **v, size_t *n)
{
    if (!strncmp(addr, "unix:", 5))
        return listen_unix(addr + 5, v, n);
    if (!strncmp(addr, "tcp:", 4))
        return listen_tcp(addr + 4, v, n);
    if (addr[0] == '/' || addr[0] == '.')
        return listen_unix(addr, v, n);
    return vd_err(-EINVAL, "%s: expected unix:PATH or tcp:HOST:PORT", addr);
}

int vdd_listen_fd(int fd, struct vdd_listener **v, size_t *n)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char desc[64];
    bool tcp = false;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 && ss.ss_family != AF_UNIX)
        tcp = true;
    snprintf(desc, sizeof desc, "fd:%d", fd);
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return add(v, n, fd, tcp, desc, NULL);
}

struct serve_job {
    int fd;
    char peer[96];
};

static void serve_on_worker(void *opaque)
{
    struct serve_job *j = opaque;
    vd_nbd_serve(vd_loop_current(), j->fd, j->fd, j->peer);
    free(j);
}

static void on_accept(struct vd_loop *loop, int fd, uint32_t events, void *opaque)
{
    struct vdd_listener *l = opaque;
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int c = accept4(fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                vd_log(VD_LOG_WARN, "%s: accept: %s", l->desc, strerror(errno));
            return;
        }
        struct serve_job *j = malloc(sizeof *j);
        if (!j) {
            close(c);
            continue;
        }
        j->fd = c;
        l->accepted++;
        if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6) {
            int one = 1;
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            char h[INET6_ADDRSTRLEN] = "?", p[16] = "?";
            getnameinfo((struct sockaddr *)&ss, len, h, sizeof h, p, sizeof p, NI_NUMERICHOST | NI_NUMERICSERV);
            snprintf(j->peer, sizeof j->peer, ss.ss_family == AF_INET6 ? "tcp:[%s]:%s" : "tcp:%s:%s", h, p);
        } else {
            snprintf(j->peer, sizeof j->peer, "%.80s#%lu", l->desc, l->accepted);
        }
        vd_loop_post(vdd_worker_next(), serve_on_worker, j);
    }
}

int vdd_listen_start(struct vd_loop *main_loop, struct vdd_listener *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int r = vd_loop_add_fd(main_loop, v[i].fd, EPOLLIN, on_accept, &v[i]);
        if (r < 0)
            return vd_err(r, "%s: cannot watch the socket", v[i].desc);
        vd_log(VD_LOG_INFO, "NBD server listening on %s", v[i].desc);
    }
    return 0;
}

void vdd_listen_close(struct vd_loop *main_loop, struct vdd_listener *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (main_loop)
            vd_loop_del_fd(main_loop, v[i].fd);
        close(v[i].fd);
        if (v[i].unlink_path)
            unlink(v[i].unlink_path);
        free(v[i].unlink_path);
        free(v[i].desc);
    }
    free(v);
}
