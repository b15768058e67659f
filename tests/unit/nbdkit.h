/* For the unit tests that need a real NBD server: nbdkit on a Unix socket,
 * in the foreground and ending with the test process. */
#ifndef VDISK_TEST_NBDKIT_H
#define VDISK_TEST_NBDKIT_H
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* Starts nbdkit serving on sock; the arguments after sock, ended by a
 * NULL, are its further options, the plugin and the plugin's arguments.
 * Returns the server's pid once its pid file (sock.pid) is written, or -1
 * after 5 s without it. */
static inline pid_t start_nbdkit(const char *sock, ...)
{
    char pidfile[160];
    const char *argv[16] = { "nbdkit", "-U", sock, "-P", pidfile, "-f", "--exit-with-parent" };
    int n = 7;
    va_list ap;
    va_start(ap, sock);
    for (const char *a; n < 15 && (a = va_arg(ap, const char *)); )
        argv[n++] = a;
    va_end(ap);
    snprintf(pidfile, sizeof(pidfile), "%s.pid", sock);
    pid_t child = fork();
    if (child == 0) {
        execvp("nbdkit", (char *const *)argv);
        _exit(127);
    }
    /* ready once the pid file exists */
    for (int i = 0; i < 500; i++) {
        struct stat st;
        if (stat(pidfile, &st) == 0 && st.st_size > 0)
            return child;
        usleep(10000);
    }
    return -1;
}

#endif
