/* Thread-local error messages (include/vdisk/error.h). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include "vdisk/error.h"

static __thread char msg[1024];
static __thread int have_msg;

int vd_err(int err, const char *fmt, ...)
{
    /* Format aside first: callers pass vd_errmsg() (this very buffer) as an
     * argument to wrap the previous message. */
    char tmp[sizeof(msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    memcpy(msg, tmp, sizeof(msg));
    have_msg = 1;
    return err;
}

int vd_err_prefix(int err, const char *fmt, ...)
{
    char pre[512], old[sizeof(msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof(pre), fmt, ap);
    va_end(ap);
    snprintf(old, sizeof(old), "%s", have_msg ? msg : strerror(err < 0 ? -err : err));
    /* truncation of an over-long message is fine */
    size_t n = strlen(pre);
    if (n > sizeof(msg) - 3)
        n = sizeof(msg) - 3;
    memcpy(msg, pre, n);
    msg[n] = ':';
    msg[n + 1] = ' ';
    size_t m = strlen(old);
    if (m > sizeof(msg) - n - 3)
        m = sizeof(msg) - n - 3;
    memcpy(msg + n + 2, old, m);
    msg[n + 2 + m] = 0;
    have_msg = 1;
    return err;
}

const char *vd_errmsg(int err)
{
    if (have_msg)
        return msg;
    return strerror(err < 0 ? -err : err);
}

void vd_err_clear(void)
{
    have_msg = 0;
    msg[0] = 0;
}
