/* Fuzz the VHD and VMDK drivers' changing operations on hostile images:
 * the first input byte picks the format (even: vhd, odd: vmdk) and the
 * operations' sizes; the rest is the image file. It is opened writable
 * without its backing chain, then written, zeroed, discarded and resized.
 * Nothing may crash, hang or leak; errors are fine. */
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    if (!dir[0]) {
        snprintf(dir, sizeof(dir), "%s/vdisk-fuzz-ops-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
        if (!mkdtemp(dir))
            abort();
        snprintf(name, sizeof(name), "%s/image", dir);
        atexit(cleanup);
    }
    uint8_t sel = data[0];
    int fd = open(name, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0)
        return 0;
    if (write(fd, data + 1, size - 1) != (ssize_t)(size - 1)) {
        close(fd);
        return 0;
    }
    close(fd);
    struct vd_open_opts o = { .format = sel & 1 ? "vmdk" : "vhd", .nolock = true, .no_backing = true };
    struct vd_disk *d;
    if (vd_disk_open(name, &o, &d) < 0)
        return 0;
    uint64_t sz = vd_disk_size(d);
    if (sz == 0 || sz > (1ull << 40)) {
        vd_disk_close(d);
        return 0;
    }
    static uint8_t buf[64 << 10];
    memset(buf, 0xa5, sizeof(buf));
    uint64_t unit = (sel & 2) ? 512 : 65536;
    uint64_t a = sz / 3 / unit * unit, b = sz / 2;
    uint64_t n = sz - a < sizeof(buf) ? sz - a : sizeof(buf);
    vd_disk_pwrite(d, buf, n, a, 0);
    vd_disk_write_zeroes(d, 0, sz < (4u << 20) ? sz : (4u << 20), (sel & 4) ? VD_REQ_MAY_UNMAP : 0);
    vd_disk_write_zeroes(d, b, sz - b < 3000 ? sz - b : 3000, 0);
    vd_disk_discard(d, a, sz - a < (1u << 20) ? sz - a : (1u << 20));
    uint64_t ns = (sel & 8) ? sz + (sel >> 4) * unit : sz - (sz > unit ? unit : 0);
    if (ns && ns != sz)
        vd_disk_resize(d, ns, VD_PREALLOC_OFF);
    sz = vd_disk_size(d);
    n = sz < sizeof(buf) ? sz : sizeof(buf);
    vd_disk_pread(d, buf, n, sz - n);
    vd_disk_close(d);
    return 0;
}
