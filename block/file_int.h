/* Private to block/: forcing the syncs that cache=unsafe skips. */
#ifndef VDISK_FILE_INT_H
#define VDISK_FILE_INT_H

/* Between begin and end, syncs on the calling thread are real even on
 * cache=unsafe files (vd_disk_sync_now runs the format's flush and the
 * file syncs synchronously inside such a span). Nests. */
void vd_file_force_sync_begin(void);
void vd_file_force_sync_end(void);

#endif
