/* vdiskd internals shared by its files (main, listeners, workers). */
#ifndef VDISKD_H
#define VDISKD_H

#include <stdbool.h>
#include <stddef.h>
#include "vdisk/loop.h"

/* worker threads, each running its own loop */
int  vdd_workers_start(unsigned n);
struct vd_loop *vdd_worker_next(void);      /* round-robin */
void vdd_workers_stop(void);

/* listening sockets */
struct vdd_listener {
    int fd;
    bool tcp;
    char *desc;          /* "unix:/path" or "tcp:host:port" */
    char *unlink_path;   /* a Unix socket we created */
    unsigned long accepted;
};
/* "unix:PATH" or "tcp:HOST:PORT" (HOST may be [v6] or empty for any). Adds
 * one listener (tcp: one per resolved address) to *v. */
int  vdd_listen(const char *addr, struct vdd_listener **v, size_t *n);
/* Adopt an already listening socket (socket activation). */
int  vdd_listen_fd(int fd, struct vdd_listener **v, size_t *n);
int  vdd_listen_start(struct vd_loop *main_loop, struct vdd_listener *v, size_t n);
void vdd_listen_close(struct vd_loop *main_loop, struct vdd_listener *v, size_t n);

#endif
