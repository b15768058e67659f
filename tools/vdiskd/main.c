/* vdiskd: the disk daemon. Serves exports over NBD (Unix, TCP, stdio or
 * sockets from systemd), is driven at run time through the JSON control
 * socket, and shuts down cleanly on SIGTERM/SIGINT: stop accepting, let
 * in-flight requests finish, flush, close. */
#include <errno.h>
#include <getopt.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include "nbd/nbd_server.h"
#include "vdiskd.h"
#include "vdisk/control.h"
#include "vdisk/error.h"
#include "vdisk/export.h"

static struct vd_loop *main_loop;
static int exit_status;
/* file-level so that early exits leave nothing unreachable */
static const char **nbd, **exports;

static void usage(FILE *f)
{
    fprintf(f,
"Usage: vdiskd [OPTION]... --export file=PATH[,...]...\n"
"Serve disk images over NBD, driven by a JSON control socket.\n"
"\n"
"Exports (repeatable):\n"
"  --export name=NAME,file=PATH[,format=FMT][,readonly=on][,cache=writeback|none|writethrough|directsync|unsafe]\n"
"           [,aio=io_uring|native|threads][,discard=unmap|ignore][,description=TEXT]\n"
"                         NAME defaults to the file's base name; the empty name\n"
"                         selects the first export. FMT is probed when absent.\n"
"Listening (repeatable; default unix:$XDG_RUNTIME_DIR/vdiskd/nbd.sock, or\n"
"unix:./vdiskd.sock when XDG_RUNTIME_DIR is unset):\n"
"  --nbd unix:PATH        NBD on a Unix socket\n"
"  --nbd tcp:HOST:PORT    NBD on TCP (HOST may be empty or [IPv6])\n"
"  --stdio                one NBD connection on stdin/stdout, then exit\n"
"  Sockets passed by systemd (LISTEN_FDS) replace --nbd; one named \"control\"\n"
"  (FileDescriptorName=control) is the control socket.\n"
"Control:\n"
"  --control PATH         JSON control socket (see vdisk ctl)\n"
"TLS:\n"
"  --tls=off|on|require   offer TLS (on) or insist on it (require); default off\n"
"  --tls-cert FILE --tls-key FILE   X.509 server certificate and key (PEM)\n"
"  --tls-ca FILE          CA for client certificates\n"
"  --tls-verify-peer      require a client certificate signed by --tls-ca\n"
"  --tls-psk-file FILE    pre-shared keys (psktool format: identity:hexkey)\n"
"Process:\n"
"  --threads N            event-loop threads (default: one per CPU; 1 with --stdio)\n"
"  --handshake-timeout S  close clients that choose no export within S seconds (60)\n"
"  --drain-timeout S      on export removal and shutdown, close a client that has\n"
"                         not taken all its replies within S seconds (5)\n"
"  --log=stderr|syslog    where messages go (default stderr)\n"
"  --log-level=LEVEL      error, warning, info (default) or debug\n"
"  --pidfile FILE         write the process id there\n"
"  -h, --help             this text\n"
"  -V, --version          the version\n");
}

static void fatal(const char *what, int r) __attribute__((noreturn));
static void fatal(const char *what, int r)
{
    fprintf(stderr, "vdiskd: %s%s%s\n", what ? what : "", what ? ": " : "", vd_errmsg(r));
    exit(1);
}

static void stop_main(void *opaque)
{
    vd_loop_stop(main_loop);
}

static int cmd_quit(json_t *args, json_t **ret)
{
    vd_log(VD_LOG_INFO, "quit requested on the control socket");
    /* Stop after this reply has been written. */
    vd_loop_post(main_loop, stop_main, NULL);
    return 0;
}

static void on_signal(struct vd_loop *loop, int fd, uint32_t events, void *opaque)
{
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGHUP) {
            vd_log(VD_LOG_INFO, "SIGHUP ignored");
            continue;
        }
        vd_log(VD_LOG_INFO, "%s received, shutting down", strsignal((int)si.ssi_signo));
        vd_loop_stop(loop);
    }
}

static void stdio_idle(void *opaque)
{
    vd_loop_stop(main_loop);
}

static void serve_stdio(void *opaque)
{
    vd_nbd_serve(vd_loop_current(), 0, 1, "stdio");
}

/* systemd's readiness notification, when started with Type=notify. */
static void notify_ready(void)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || (path[0] != '/' && path[0] != '@'))
        return;
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    size_t len = strlen(path);
    if (len >= sizeof a.sun_path)
        return;
    memcpy(a.sun_path, path, len);
    if (a.sun_path[0] == '@')
        a.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    static const char msg[] = "READY=1";
    sendto(fd, msg, sizeof msg - 1, 0, (struct sockaddr *)&a,
           (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    close(fd);
}

/* Sockets from systemd: LISTEN_PID/LISTEN_FDS(/LISTEN_FDNAMES). */
static int activation(struct vdd_listener **v, size_t *n, int *control_fd)
{
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    if (!pid || !fds || atol(pid) != (long)getpid())
        return 0;
    int count = atoi(fds);
    char *names = getenv("LISTEN_FDNAMES") ? strdup(getenv("LISTEN_FDNAMES")) : NULL;
    char *save = NULL, *name = names ? strtok_r(names, ":", &save) : NULL;
    for (int i = 0; i < count; i++) {
        int fd = 3 + i;
        if (name && !strcmp(name, "control"))
            *control_fd = fd;
        else {
            int r = vdd_listen_fd(fd, v, n);
            if (r < 0) {
                free(names);
                return r;
            }
        }
        if (name)
            name = strtok_r(NULL, ":", &save);
    }
    free(names);
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    return count;
}

static char *default_socket(void)
{
    const char *x = getenv("XDG_RUNTIME_DIR");
    char *p;
    if (x && x[0]) {
        if (asprintf(&p, "unix:%s/vdiskd/nbd.sock", x) < 0)
            return NULL;
        return p;
    }
    return strdup("unix:./vdiskd.sock");
}

enum {
    OPT_NBD = 256, OPT_EXPORT, OPT_CONTROL, OPT_TLS, OPT_TLS_CERT, OPT_TLS_KEY, OPT_TLS_CA,
    OPT_TLS_VERIFY, OPT_TLS_PSK, OPT_THREADS, OPT_LOG, OPT_LOG_LEVEL, OPT_PIDFILE, OPT_STDIO,
    OPT_HS_TIMEOUT,
    OPT_DRAIN_TIMEOUT,
};

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "nbd", required_argument, NULL, OPT_NBD },
        { "export", required_argument, NULL, OPT_EXPORT },
        { "control", required_argument, NULL, OPT_CONTROL },
        { "tls", required_argument, NULL, OPT_TLS },
        { "tls-cert", required_argument, NULL, OPT_TLS_CERT },
        { "tls-key", required_argument, NULL, OPT_TLS_KEY },
        { "tls-ca", required_argument, NULL, OPT_TLS_CA },
        { "tls-verify-peer", no_argument, NULL, OPT_TLS_VERIFY },
        { "tls-psk-file", required_argument, NULL, OPT_TLS_PSK },
        { "threads", required_argument, NULL, OPT_THREADS },
        { "log", required_argument, NULL, OPT_LOG },
        { "log-level", required_argument, NULL, OPT_LOG_LEVEL },
        { "pidfile", required_argument, NULL, OPT_PIDFILE },
        { "stdio", no_argument, NULL, OPT_STDIO },
        { "handshake-timeout", required_argument, NULL, OPT_HS_TIMEOUT },
        { "drain-timeout", required_argument, NULL, OPT_DRAIN_TIMEOUT },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    nbd = calloc((size_t)argc + 1, sizeof *nbd);
    exports = calloc((size_t)argc, sizeof *exports);
    size_t nnbd = 0, nexports = 0;
    const char *control = NULL, *pidfile = NULL;
    struct vd_nbd_tls_config tlscfg = {0};
    enum vd_nbd_tls tls = VD_NBD_TLS_OFF;
    bool use_syslog = false, stdio_mode = false;
    enum vd_log_level level = VD_LOG_INFO;
    long threads = 0, hs_timeout = 0, drain_timeout = 0;
    int c;
    if (!nbd || !exports)
        return 1;
    while ((c = getopt_long(argc, argv, "hV", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_NBD: nbd[nnbd++] = optarg; break;
        case OPT_EXPORT: exports[nexports++] = optarg; break;
        case OPT_CONTROL: control = optarg; break;
        case OPT_TLS:
            if (!strcmp(optarg, "off")) tls = VD_NBD_TLS_OFF;
            else if (!strcmp(optarg, "on")) tls = VD_NBD_TLS_ON;
            else if (!strcmp(optarg, "require")) tls = VD_NBD_TLS_REQUIRE;
            else {
                fprintf(stderr, "vdiskd: --tls=%s: expected off, on or require\n", optarg);
                return 1;
            }
            break;
        case OPT_TLS_CERT: tlscfg.cert = optarg; break;
        case OPT_TLS_KEY: tlscfg.key = optarg; break;
        case OPT_TLS_CA: tlscfg.ca = optarg; break;
        case OPT_TLS_VERIFY: tlscfg.verify_peer = true; break;
        case OPT_TLS_PSK: tlscfg.psk_file = optarg; break;
        case OPT_THREADS: {
            char *end;
            threads = strtol(optarg, &end, 10);
            if (*end || threads < 1 || threads > 256) {
                fprintf(stderr, "vdiskd: --threads=%s: expected 1 to 256\n", optarg);
                return 1;
            }
            break;
        }
        case OPT_LOG:
            if (!strcmp(optarg, "syslog")) use_syslog = true;
            else if (!strcmp(optarg, "stderr")) use_syslog = false;
            else {
                fprintf(stderr, "vdiskd: --log=%s: expected stderr or syslog\n", optarg);
                return 1;
            }
            break;
        case OPT_LOG_LEVEL:
            if (vd_log_level_parse(optarg, &level) < 0) {
                fprintf(stderr, "vdiskd: --log-level=%s: expected error, warning, info or debug\n", optarg);
                return 1;
            }
            break;
        case OPT_PIDFILE: pidfile = optarg; break;
        case OPT_HS_TIMEOUT: {
            char *end;
            hs_timeout = strtol(optarg, &end, 10);
            if (*end || hs_timeout < 1 || hs_timeout > 86400) {
                fprintf(stderr, "vdiskd: --handshake-timeout=%s: expected 1 to 86400 seconds\n", optarg);
                return 1;
            }
            break;
        }
        case OPT_DRAIN_TIMEOUT: {
            char *end;
            drain_timeout = strtol(optarg, &end, 10);
            if (*end || drain_timeout < 1 || drain_timeout > 3600) {
                fprintf(stderr, "vdiskd: --drain-timeout=%s: expected 1 to 3600 seconds\n", optarg);
                return 1;
            }
            break;
        }
        case OPT_STDIO: stdio_mode = true; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("vdiskd %s\n", VDISK_VERSION); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "vdiskd: unexpected argument '%s' (exports are given with --export)\n", argv[optind]);
        return 1;
    }
    if (tls == VD_NBD_TLS_OFF && (tlscfg.cert || tlscfg.key || tlscfg.psk_file))
        tls = VD_NBD_TLS_ON;
    if (stdio_mode && nnbd) {
        fprintf(stderr, "vdiskd: --stdio cannot be combined with --nbd\n");
        return 1;
    }
    uint64_t poll_ns;
    if (vd_loop_poll_env(&poll_ns) < 0) {     /* the loops would ignore it */
        fprintf(stderr, "vdiskd: %s\n", vd_errmsg(-EINVAL));
        return 1;
    }
    if (!nexports && !control && !getenv("LISTEN_FDS")) {
        fprintf(stderr, "vdiskd: nothing to serve: give --export file=PATH, or --control to add exports later\n");
        return 1;
    }
    if (threads == 0) {
        threads = stdio_mode ? 1 : sysconf(_SC_NPROCESSORS_ONLN);
        if (threads < 1)
            threads = 1;
    }

    vd_log_setup(use_syslog, level, "vdiskd");
    signal(SIGPIPE, SIG_IGN);
    /* A shell starts background jobs with SIGINT ignored; ignored signals
     * never reach a signalfd, so take them back. */
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP);
    /* Blocked before any thread starts, so only the signalfd sees them. */
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    struct vd_nbd_tls_ctx *tls_ctx = NULL;
    int r;
    if (tls != VD_NBD_TLS_OFF && (r = vd_nbd_tls_new(&tlscfg, &tls_ctx)) < 0)
        fatal("TLS", r);
    struct vd_nbd_server_config scfg = { .tls = tls, .tls_ctx = tls_ctx,
                                         .handshake_seconds = (unsigned)hs_timeout,
                                         .drain_seconds = (unsigned)drain_timeout };
    if (stdio_mode) {
        scfg.on_idle = stdio_idle;
    }
    vd_nbd_server_configure(&scfg);

    if ((r = vd_loop_new(VD_AIO_DEFAULT, &main_loop)) < 0)
        fatal("event loop", r);
    if ((r = vdd_workers_start((unsigned)threads)) < 0)
        fatal(NULL, r);

    for (size_t i = 0; i < nexports; i++) {
        if ((r = vd_export_add(exports[i], NULL)) < 0) {
            fprintf(stderr, "vdiskd: --export %s: %s\n", exports[i], vd_errmsg(r));
            vd_export_del_all();
            vdd_workers_stop();
            vd_nbd_tls_free(tls_ctx);
            vd_loop_free(main_loop);
            return 1;
        }
    }

    struct vdd_listener *ls = NULL;
    size_t nls = 0;
    int control_fd = -1;
    struct vd_control *ctl = NULL;
    char *defsock = NULL;
    r = activation(&ls, &nls, &control_fd);
    if (r < 0)
        goto fail;
    if (!nexports && !control && control_fd < 0) {
        r = vd_err(-EINVAL, "nothing to serve: no --export and no control socket");
        goto fail;
    }
    /* Started by a client through socket activation (nbdinfo [ CMD ]): serve
     * its socket instead of stdin, and still exit after that connection. */
    bool serve_stdin = stdio_mode && r == 0;
    if (!stdio_mode && nls == 0) {
        if (!nnbd && control_fd < 0 && (defsock = default_socket()))
            nbd[nnbd++] = defsock;
        for (size_t i = 0; i < nnbd; i++)
            if ((r = vdd_listen(nbd[i], &ls, &nls)) < 0)
                goto fail;
    }
    if ((r = vdd_listen_start(main_loop, ls, nls)) < 0)
        goto fail;
    if (control || control_fd >= 0) {
        vd_control_register("quit", cmd_quit);
        if ((r = vd_control_open(main_loop, control, control_fd, &ctl)) < 0)
            goto fail;
        vd_log(VD_LOG_INFO, "control socket %s", control ? control : "from systemd");
    }
    int sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0 || vd_loop_add_fd(main_loop, sfd, EPOLLIN, on_signal, NULL) < 0) {
        r = vd_err(-errno, "signalfd: %s", strerror(errno));
        goto fail;
    }
    if (pidfile) {
        FILE *f = fopen(pidfile, "w");
        if (!f || fprintf(f, "%ld\n", (long)getpid()) < 0 || fclose(f) != 0) {
            r = vd_err(-errno, "%s: %s", pidfile, strerror(errno));
            goto fail;
        }
    }
    if (serve_stdin)
        vd_loop_post(vdd_worker_next(), serve_stdio, NULL);
    notify_ready();

    vd_loop_run(main_loop);
    /* No queued control command starts from here on (close answers them). */
    vd_control_quiesce(ctl);

    /* Shutdown. Further SIGINT/SIGTERM stay blocked: a Ctrl-C that reaches
     * both a wrapper script and vdiskd must not cut the drain short. */
    vd_loop_del_fd(main_loop, sfd);
    close(sfd);
    vdd_listen_close(main_loop, ls, nls);
    ls = NULL;
    nls = 0;
    vd_control_event("SHUTDOWN", NULL);
    vd_loop_run_once(main_loop, 0);
    vd_control_close(ctl);
    ctl = NULL;
    vd_nbd_close_all();
    vd_export_del_all();     /* drains each export's requests, flushes, closes */
    vdd_workers_stop();
    vd_nbd_tls_free(tls_ctx);
    if (pidfile)
        unlink(pidfile);
    vd_loop_free(main_loop);
    free(defsock);
    free(nbd);
    free(exports);
    vd_log(VD_LOG_INFO, "stopped");
    return exit_status;

fail:
    fprintf(stderr, "vdiskd: %s\n", vd_errmsg(r));
    vd_control_close(ctl);
    vdd_listen_close(main_loop, ls, nls);
    vd_export_del_all();
    vdd_workers_stop();
    vd_nbd_tls_free(tls_ctx);
    vd_loop_free(main_loop);
    free(defsock);
    free(nbd);
    free(exports);
    return 1;
}
