/* The daemon's log: stderr (with a level tag) or syslog, filtered by level. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include "vdisk/export.h"

static bool use_syslog;
static enum vd_log_level max_level = VD_LOG_INFO;
static const char *const names[] = { "error", "warning", "info", "debug" };

void vd_log_setup(bool to_syslog, enum vd_log_level level, const char *ident)
{
    use_syslog = to_syslog;
    max_level = level;
    if (to_syslog)
        openlog(ident, LOG_PID, LOG_DAEMON);
}

int vd_log_level_parse(const char *s, enum vd_log_level *out)
{
    for (int i = 0; i <= VD_LOG_DEBUG; i++)
        if (!strcmp(s, names[i])) {
            *out = (enum vd_log_level)i;
            return 0;
        }
    if (!strcmp(s, "warn")) {
        *out = VD_LOG_WARN;
        return 0;
    }
    return -22;
}

bool vd_log_enabled(enum vd_log_level level)
{
    return level <= max_level;
}

void vd_log(enum vd_log_level level, const char *fmt, ...)
{
    if (level > max_level)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (use_syslog) {
        static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
        syslog(prio[level], "%s", msg);
        return;
    }
    /* One write per line so that threads do not interleave. */
    fprintf(stderr, "vdiskd: %s: %s\n", names[level], msg);
}
