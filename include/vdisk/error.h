/* Error reporting: functions return 0 or a negative errno; where a person
 * will read the failure, the function also records a message (naming the
 * file, the offset and the cause) in a thread-local buffer. */
#ifndef VDISK_ERROR_H
#define VDISK_ERROR_H

/* Record a formatted message for the calling thread and return err
 * (a negative errno), so that `return vd_err(-EINVAL, "...")` reads well. */
int vd_err(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefix the current message with "prefix: " (e.g. the file name). */
int vd_err_prefix(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The last message recorded on this thread; when none was recorded since the
 * last vd_err_clear(), strerror(-err) is returned instead. */
const char *vd_errmsg(int err);
void vd_err_clear(void);

#endif
