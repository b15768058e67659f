/* libFuzzer target: the input is a qcow2 image. It is opened (read-only,
 * without its backing chain), read in a few places, walked with block
 * status, described (info) and checked; then opened writable and written,
 * discarded, zeroed and flushed. Nothing may crash, hang or leak. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <jansson.h>
#include "vdisk/block.h"
#include "vdisk/error.h"

static char path[64];

static void put_file(const uint8_t *data, size_t size)
{
    if (!path[0])
        snprintf(path, sizeof(path), "/tmp/fuzz-qcow2-%d.img", (int)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        abort();
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, data + done, size - done);
        if (n <= 0)
            abort();
        done += (size_t)n;
    }
    close(fd);
}

static void read_some(struct vd_disk *d)
{
    static uint8_t buf[1 << 20];
    uint64_t size = vd_disk_size(d);
    uint64_t offs[] = { 0, size / 2, size > 70000 ? size - 70000 : 0 };
    for (int i = 0; i < 3; i++) {
        if (offs[i] >= size)
            continue;
        uint64_t n = size - offs[i] < 70000 ? size - offs[i] : 70000;
        vd_disk_pread(d, buf, (size_t)n, offs[i]);
    }
    uint64_t off = 0;
    for (int i = 0; i < 64 && off < size; i++) {
        struct vd_extent e;
        if (vd_disk_block_status(d, off, size - off, &e) < 0 || e.len == 0)
            break;
        off += e.len;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    put_file(data, size);
    struct vd_open_opts o = { .format = "qcow2", .readonly = true, .no_backing = true, .nolock = true };
    struct vd_disk *d;
    if (vd_disk_open(path, &o, &d) == 0) {
        read_some(d);
        struct vd_layer *l = vd_disk_top(d);
        json_t *info = json_object();
        l->fmt->info(l, info);
        json_decref(info);
        struct vd_check c = { .image_end_offset = -1 };
        pthread_mutex_lock(&l->lock);
        l->fmt->check(l, 0, &c);
        pthread_mutex_unlock(&l->lock);
        vd_disk_close(d);
    }
    o.readonly = false;
    if (vd_disk_open(path, &o, &d) == 0) {
        static uint8_t w[8192];
        memset(w, 0xa5, sizeof(w));
        uint64_t vs = vd_disk_size(d);
        if (vs >= sizeof(w)) {
            vd_disk_pwrite(d, w, sizeof(w), 0, 0);
            vd_disk_pwrite(d, w, 100, vs / 2, 0);
            vd_disk_discard(d, 0, vs / 4);
            vd_disk_write_zeroes(d, vs / 2, vs / 4, VD_REQ_MAY_UNMAP);
            vd_disk_pwrite(d, w, sizeof(w), vs - sizeof(w), 0);
            read_some(d);
        }
        vd_disk_flush(d);
        vd_disk_close(d);
    }
    vd_err_clear();
    return 0;
}
