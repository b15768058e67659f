/* vdisk ctl: one command to a running vdiskd over its JSON control socket
 * (docs/control.md), printing the reply's "return" value as JSON. */
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "cli.h"

#define TIMEOUT_MS 120000   /* export-del waits for the export to drain */

/* One line from fd (blocking, with a timeout); caller frees. */
static char *read_line(int fd, char **buf, size_t *len, size_t *cap)
{
    for (;;) {
        char *nl = *len ? memchr(*buf, '\n', *len) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - *buf);
            char *line = strndup(*buf, n);
            memmove(*buf, nl + 1, *len - n - 1);
            *len -= n + 1;
            return line;
        }
        if (*cap - *len < 4096) {
            if (*cap > (64u << 20))
                return NULL;
            *cap = *cap ? *cap * 2 : 8192;
            char *p = realloc(*buf, *cap);
            if (!p)
                return NULL;
            *buf = p;
        }
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, TIMEOUT_MS) <= 0)
            return NULL;
        ssize_t n = read(fd, *buf + *len, *cap - *len);
        if (n <= 0)
            return NULL;
        *len += (size_t)n;
    }
}

/* "key=value,key2=value2" or "key=value key2=value2" → a JSON object of strings. */
static json_t *kv_args(int argc, char **argv)
{
    json_t *o = json_object();
    for (int i = 0; i < argc; i++) {
        char *dup = strdup(argv[i]), *save = NULL;
        for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(t, '=');
            if (!eq) {
                vd_cli_err("ctl: argument '%s' is not key=value (or give one JSON object)", t);
                free(dup);
                json_decref(o);
                return NULL;
            }
            *eq = 0;
            json_object_set_new(o, t, json_string(eq + 1));
        }
        free(dup);
    }
    return o;
}

static int run(int argc, char **argv)
{
    static const struct option lopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "events", no_argument, NULL, 'e' },
        { NULL, 0, NULL, 0 },
    };
    bool events = false;
    int c;
    while ((c = getopt_long(argc, argv, "+:e", lopts, NULL)) != -1) {
        switch (c) {
        case 'e': events = true; break;
        default: return vd_cli_bad_option(argv[0], c, argv);
        }
    }
    if (argc - optind < 2)
        return vd_cli_usage(argv[0], "Expecting a control socket and a command");
    const char *path = argv[optind], *cmd = argv[optind + 1];
    json_t *args = NULL;
    int nargs = argc - optind - 2;
    char **av = argv + optind + 2;
    if (nargs == 1 && av[0][0] == '{') {
        json_error_t jerr;
        args = json_loads(av[0], 0, &jerr);
        if (!json_is_object(args)) {
            vd_cli_err("ctl: arguments are not a JSON object: %s", args ? "not an object" : jerr.text);
            json_decref(args);
            return 1;
        }
    } else if (nargs > 0 && !(args = kv_args(nargs, av))) {
        return 1;
    }

    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof a.sun_path) {
        vd_cli_err("%s: socket path too long", path);
        json_decref(args);
        return 1;
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        vd_cli_err("%s: cannot connect: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        json_decref(args);
        return 1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = 1;
    json_t *req = json_pack("{s:s,s:i}", "execute", cmd, "id", 1);
    if (args)
        json_object_set_new(req, "arguments", args);
    char *text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    char *greeting = read_line(fd, &buf, &len, &cap);
    if (!greeting) {
        vd_cli_err("%s: no greeting from the daemon", path);
        goto out;
    }
    free(greeting);
    size_t tl = strlen(text);
    text[tl] = '\n';   /* json_dumps leaves room: replace the NUL, send tl + 1 */
    if (send(fd, text, tl + 1, MSG_NOSIGNAL) != (ssize_t)(tl + 1)) {
        vd_cli_err("%s: send: %s", path, strerror(errno));
        goto out;
    }
    for (;;) {
        char *line = read_line(fd, &buf, &len, &cap);
        if (!line) {
            vd_cli_err("%s: the daemon closed the connection or did not answer", path);
            goto out;
        }
        json_t *msg = json_loads(line, 0, NULL);
        free(line);
        if (!msg)
            continue;
        if (json_object_get(msg, "event")) {
            if (events)
                vd_cli_json_print(msg);
            json_decref(msg);
            continue;
        }
        json_t *ret = json_object_get(msg, "return");
        if (ret) {
            if (!json_is_object(ret) || json_object_size(ret))
                vd_cli_json_print(ret);
            rc = 0;
        } else {
            json_t *err = json_object_get(msg, "error");
            vd_cli_err("%s: %s", cmd, json_string_value(json_object_get(err, "desc")) ?: "error");
        }
        json_decref(msg);
        break;
    }
out:
    free(text);
    free(buf);
    close(fd);
    return rc;
}

static const struct vd_cli_cmd cmd = {
    "ctl", "[--events] SOCKET COMMAND [JSON-OBJECT | KEY=VALUE[,...]...]",
    "Send one command to a running vdiskd over its control socket\n"
    "\n"
    "Prints the command's result as JSON and exits 0, or prints the daemon's\n"
    "error and exits 1. Arguments are one JSON object or key=value pairs.\n"
    "Commands: export-add, export-del, query-exports, query-stats,\n"
    "query-version, quit (see docs/control.md).\n"
    "  -e, --events   also print events that arrive before the reply\n"
    "Example: vdisk ctl /run/vdiskd/ctl.sock export-add name=d0,file=disk.qcow2\n",
    run,
};
VD_CLI_COMMAND(cmd)
