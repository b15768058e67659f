/* Private to the I/O engines and the loop: request progress bookkeeping
 * shared by every engine, so that short transfers and reads past the end
 * of a file behave the same whichever engine runs them. */
#ifndef VDISK_ENGINE_INT_H
#define VDISK_ENGINE_INT_H

#include <sys/types.h>
#include "vdisk/engine.h"

/* Reset the progress fields before the first attempt. */
void vd_io_begin(struct vd_io *io);

/* Account the result of one attempt (bytes moved, or -errno). Returns true
 * when the request is finished, with *res = 0 or -errno; false when the
 * rest must be submitted again at io->off + io->xfer from io->cur_iov /
 * io->cur_iovcnt. A read that reaches the end of the file zero-fills what
 * is left and succeeds. */
bool vd_io_advance(struct vd_io *io, ssize_t n, int *res);

/* Finish io on its loop's thread: io->done(io, res). */
static inline void vd_io_complete(struct vd_io *io, int res)
{
    io->done(io, res);
}

/* Do the whole of io synchronously on the calling thread (preadv, pwritev,
 * fdatasync, resuming short transfers); returns 0 or -errno. */
int vd_io_run_sync(struct vd_io *io);

#endif
