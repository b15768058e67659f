/* A libFuzzer harness shared by the format targets: the input is an image
 * file of the given format; it is opened read-only without its backing
 * chain, read at its start, middle and end, walked with block status and
 * described with info. Nothing may crash, hang or leak.
 * Include once from a target that defines LLVMFuzzerTestOneInput. */
#ifndef VDISK_FUZZ_IMAGE_H
#define VDISK_FUZZ_IMAGE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include "vdisk/block.h"

static char dir[64], name[96];
static void cleanup(void)
{
    unlink(name);
    rmdir(dir);
}

static int fuzz_image(const uint8_t *data, size_t size, const char *format)
{
    /* A file of its own in a private folder, so that extent names in a
     * descriptor resolve to nothing of the fuzzer's. */
    if (!dir[0]) {
        snprintf(dir, sizeof(dir), "%s/vdisk-fuzz-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
        if (!mkdtemp(dir))
            abort();
        snprintf(name, sizeof(name), "%s/image", dir);
        atexit(cleanup);
    }
    int fd = open(name, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0)
        return 0;
    if (write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    close(fd);
    struct vd_open_opts o = { .format = format, .readonly = true, .nolock = true, .no_backing = true };
    struct vd_disk *d;
    if (vd_disk_open(name, &o, &d) == 0) {
        uint64_t sz = vd_disk_size(d);
        static uint8_t buf[256 << 10];
        /* The first, a middle and the last 256 KiB, and a walk of block status. */
        uint64_t offs[3] = { 0, sz / 2, sz > sizeof(buf) ? sz - sizeof(buf) : 0 };
        for (int i = 0; i < 3; i++) {
            uint64_t n = sz - offs[i] < sizeof(buf) ? sz - offs[i] : sizeof(buf);
            if (n)
                vd_disk_pread(d, buf, n, offs[i]);
        }
        uint64_t off = 0;
        for (int i = 0; i < 64 && off < sz; i++) {
            struct vd_extent e;
            if (vd_disk_block_status(d, off, sz - off, &e) < 0 || e.len == 0)
                break;
            off += e.len;
        }
        struct vd_layer *l = vd_disk_top(d);
        json_t *info = json_object();
        if (l->fmt->info)
            l->fmt->info(l, info);
        json_decref(info);
        vd_disk_close(d);
    }
    return 0;
}

#endif
