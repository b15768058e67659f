/* The daemon's JSON control socket (docs/control.md): one JSON object per
 * line in each direction, QMP-like:
 *   → {"execute": "query-exports", "arguments": {...}, "id": 1}
 *   ← {"return": ..., "id": 1}  or  {"error": {"class": "...", "desc": "..."}, "id": 1}
 *   ← {"event": "EXPORT_DELETED", "data": {...}, "timestamp": {...}}
 * Commands register by name from any file; they run on the control loop's
 * thread and must not block it (the loop also accepts NBD connections),
 * except blocking ones, which run on the server's command thread. */
#ifndef VDISK_CONTROL_H
#define VDISK_CONTROL_H

#include <jansson.h>
#include "loop.h"

/* args: the "arguments" object (never NULL). Return 0 and set *ret (a new
 * reference; NULL means {}), or -errno with a message through vd_err(). */
typedef int (*vd_control_fn)(json_t *args, json_t **ret);
void vd_control_register(const char *name, vd_control_fn fn);
/* A command that waits for disks (opens, drains, flushes, resizes: network
 * round trips on RBD): it runs on the server's one command thread, one
 * such command at a time in the order received, while the loop serves
 * everything else; its client gets no other reply before this one. */
void vd_control_register_blocking(const char *name, vd_control_fn fn);

struct vd_control;
/* Serve the control protocol on a listening Unix socket (path: created,
 * and removed by vd_control_close; or fd >= 0: an already listening one). */
int  vd_control_open(struct vd_loop *loop, const char *path, int fd, struct vd_control **out);
void vd_control_close(struct vd_control *c);
/* Shutdown has begun: the command thread starts no further blocking
 * command (the one under way finishes); vd_control_close answers those
 * still queued with a shutdown error. Idempotent; c may be NULL. */
void vd_control_quiesce(struct vd_control *c);
/* Broadcast an event to every control client (thread-safe; data is
 * consumed, may be NULL). */
void vd_control_event(const char *name, json_t *data);
/* Run one command as a control client would (tests, --export at start-up):
 * returns the reply object ({"return"} or {"error"}). */
json_t *vd_control_execute(json_t *request);

#endif
