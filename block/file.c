/* Host files: the protocol dispatch and the posix backend (local files and
 * block devices). Direct (O_DIRECT) files get aligned bounce buffers for
 * unaligned synchronous access; see include/vdisk/file.h. */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "vdisk/error.h"
#include "vdisk/file.h"
#include "block/file_int.h"

#define MAX_PROTOS 8
static const struct vd_proto *protos[MAX_PROTOS];
static int nprotos;

void vd_proto_register(const struct vd_proto *p)
{
    if (nprotos < MAX_PROTOS)
        protos[nprotos++] = p;
}

static const struct vd_proto posix_proto;

void *vd_alloc_aligned(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, len ? len : 4096))
        return NULL;
    return p;
}

bool vd_buf_is_zero(const void *buf, size_t n)
{
    /* memcmp of the buffer against itself shifted by 16 bytes is vectorised
     * by libc: zero iff the first 16 bytes are and every byte equals the
     * one 16 before it. */
    const uint8_t *p = buf;
    if (n < 16) {
        for (size_t i = 0; i < n; i++)
            if (p[i])
                return false;
        return true;
    }
    static const uint8_t z[16];
    return !memcmp(p, z, 16) && !memcmp(p, p + 16, n - 16);
}

/* The backend that serves name: the first registered one that claims it,
 * else the posix backend. */
static const struct vd_proto *proto_for(const char *name)
{
    for (int i = 0; i < nprotos; i++)
        if (protos[i]->match && protos[i]->match(name))
            return protos[i];
    return &posix_proto;
}

bool vd_file_name_is_local(const char *name)
{
    return proto_for(name) == &posix_proto;
}

int vd_file_open(const char *name, int flags, enum vd_cache cache, struct vd_file **out)
{
    const struct vd_proto *p = proto_for(name);
    struct vd_file *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOMEM;
    f->proto = p;
    f->fd = -1;
    f->align = 1;
    f->readonly = flags & VD_FILE_RDONLY;
    f->unsafe = cache == VD_CACHE_UNSAFE;
    f->name = strdup(name);
    pthread_mutex_init(&f->rmw_lock, NULL);
    int r = f->name ? p->open(f, name, flags, cache) : -ENOMEM;
    if (r < 0) {
        pthread_mutex_destroy(&f->rmw_lock);
        free(f->name);
        free(f);
        return r;
    }
    *out = f;
    return 0;
}

void vd_file_close(struct vd_file *f)
{
    if (!f)
        return;
    f->proto->close(f);
    pthread_mutex_destroy(&f->rmw_lock);
    free(f->name);
    free(f);
}

#define DISPATCH(op, ...) \
    (f->proto->op ? f->proto->op(f, __VA_ARGS__) : \
     vd_err(-ENOTSUP, "%s: the %s backend cannot " #op, f->name, f->proto->name))

int vd_file_pread(struct vd_file *f, void *buf, size_t len, uint64_t off)
{
    return len ? DISPATCH(pread, buf, len, off) : 0;
}

int vd_file_pwrite(struct vd_file *f, const void *buf, size_t len, uint64_t off)
{
    if (f->readonly)
        return vd_err(-EROFS, "%s: opened read-only", f->name);
    return len ? DISPATCH(pwrite, buf, len, off) : 0;
}

/* Depth of vd_file_force_sync_begin on this thread: the forced syncs run
 * synchronously on the thread that asked for them. */
static _Thread_local int force_sync;

void vd_file_force_sync_begin(void)
{
    force_sync++;
}

void vd_file_force_sync_end(void)
{
    force_sync--;
}

bool vd_file_sync_skipped(const struct vd_file *f)
{
    return f->unsafe && force_sync == 0;
}

int vd_file_sync_now(struct vd_file *f)
{
    return f->proto->sync ? f->proto->sync(f) : 0;
}

int vd_file_sync(struct vd_file *f)
{
    if (vd_file_sync_skipped(f))
        return 0;
    return vd_file_sync_now(f);
}

int vd_file_start_writeback(struct vd_file *f, uint64_t off, uint64_t len)
{
    if (f->proto != &posix_proto || f->fd < 0 || f->direct || f->readonly)
        return 0;
    if (sync_file_range(f->fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE) < 0 &&
        errno != ESPIPE && errno != EINVAL)
        return vd_err(-errno, "%s: starting write-back failed: %s", f->name, strerror(errno));
    return 0;
}

int vd_file_pwrite_durable(struct vd_file *f, const void *buf, size_t len, uint64_t off)
{
    if (f->readonly)
        return vd_err(-EROFS, "%s: opened read-only", f->name);
    if (vd_file_sync_skipped(f))
        return vd_file_pwrite(f, buf, len, off);
    /* Local buffered files: RWF_DSYNC writes back this range alone, then
     * flushes the disk cache, rather than all the data written since the
     * last sync. */
    if (f->proto == &posix_proto && !f->direct) {
        const char *p = buf;
        while (len) {
            struct iovec iov = { (void *)p, len };
            ssize_t n = pwritev2(f->fd, &iov, 1, (off_t)off, RWF_DSYNC);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EOPNOTSUPP || errno == EINVAL)
                    break;      /* no per-write sync here: write, then sync */
                int e = errno;
                return vd_err(-e, "%s: write of %zu bytes at offset %llu failed: %s",
                              f->name, len, (unsigned long long)off, strerror(e));
            }
            p += n;
            off += (uint64_t)n;
            len -= (size_t)n;
        }
        if (!len)
            return 0;
        buf = p;
    }
    int r = vd_file_pwrite(f, buf, len, off);
    return r < 0 ? r : vd_file_sync(f);
}

int vd_file_size(struct vd_file *f, uint64_t *size)
{
    return DISPATCH(size, size);
}

int vd_file_truncate(struct vd_file *f, uint64_t size)
{
    return DISPATCH(truncate, size);
}

int vd_file_allocate(struct vd_file *f, uint64_t off, uint64_t len)
{
    return DISPATCH(allocate, off, len);
}

int vd_file_punch(struct vd_file *f, uint64_t off, uint64_t len)
{
    return DISPATCH(punch, off, len);
}

int vd_file_zero(struct vd_file *f, uint64_t off, uint64_t len)
{
    return DISPATCH(zero, off, len);
}

int vd_file_write_zeros(struct vd_file *f, uint64_t off, uint64_t len)
{
    size_t chunk = len < (1u << 20) ? (size_t)len : (1u << 20);
    uint8_t *z = chunk ? calloc(1, chunk) : NULL;
    if (chunk && !z)
        return -ENOMEM;
    int r = 0;
    while (len && r >= 0) {
        size_t n = len < chunk ? (size_t)len : chunk;
        r = vd_file_pwrite(f, z, n, off);
        off += n;
        len -= n;
    }
    free(z);
    return r < 0 ? r : 0;
}

int vd_file_zero_range(struct vd_file *f, uint64_t off, uint64_t len, bool unmap, bool fast)
{
    int r = -ENOTSUP;
    if (!len)
        return 0;
    if (unmap)
        r = vd_file_punch(f, off, len);
    if (r == -ENOTSUP || r == -EOPNOTSUPP)
        r = vd_file_zero(f, off, len);
    if (r != -ENOTSUP && r != -EOPNOTSUPP)
        return r;
    return fast ? -ENOTSUP : vd_file_write_zeros(f, off, len);
}

int vd_file_extent(struct vd_file *f, uint64_t off, bool *is_data, uint64_t *end)
{
    if (!f->proto->extent) {
        *is_data = true;
        *end = UINT64_MAX;
        return 0;
    }
    return f->proto->extent(f, off, is_data, end);
}

uint64_t vd_file_allocated_bytes(struct vd_file *f)
{
    return f->proto->allocated_bytes ? f->proto->allocated_bytes(f) : 0;
}

/* ---- the posix backend ---- */

/* Byte taken with an OFD lock by whoever has the image open: shared for
 * readers, exclusive for writers. Far past any real data, so it never
 * conflicts with other programs' byte-range locks on the image. */
#define LOCK_BYTE (1ULL << 46)

static int posix_lock(struct vd_file *f, bool write)
{
    struct flock fl = {
        .l_type = write ? F_WRLCK : F_RDLCK,
        .l_whence = SEEK_SET,
        .l_start = LOCK_BYTE,
        .l_len = 1,
    };
    /* A process killed with I/O in flight on io_uring keeps its files (and
     * so its locks) until the kernel tears the ring down, a moment after it
     * is reaped: wait up to a second before calling the image busy. */
    for (int tries = 0; tries < 100; tries++) {
        if (fcntl(f->fd, F_OFD_SETLK, &fl) == 0)
            return 0;
        if (errno != EAGAIN && errno != EACCES)
            break;
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    if (errno == EAGAIN || errno == EACCES)
        return vd_err(-EBUSY, "%s: image is in use by another process (%s lock held); "
                      "close it there first", f->name, write ? "a" : "a write");
    return 0;   /* file systems without locks: carry on unlocked */
}

/* Smallest alignment O_DIRECT accepts here: 512, else 4096. */
static uint32_t probe_align(int fd)
{
    int bs;
    if (ioctl(fd, BLKSSZGET, &bs) == 0 && bs > 0)
        return (uint32_t)bs;
    void *buf = vd_alloc_aligned(4096);
    if (!buf)
        return 4096;
    uint32_t a = 4096;
    if (pread(fd, buf, 512, 0) >= 0)
        a = 512;
    free(buf);
    return a;
}

static int posix_open(struct vd_file *f, const char *name, int flags, enum vd_cache cache)
{
    int oflags = O_CLOEXEC | ((flags & VD_FILE_RDONLY) ? O_RDONLY : O_RDWR);
    if (flags & VD_FILE_CREATE)
        oflags |= O_CREAT | ((flags & VD_FILE_TRUNC) ? O_TRUNC : O_EXCL);
    if (vd_cache_direct(cache))
        oflags |= O_DIRECT;
    f->fd = open(name, oflags, 0644);
    if (f->fd < 0 && errno == EINVAL && (oflags & O_DIRECT))
        return vd_err(-EINVAL, "%s: cache=none (O_DIRECT) is not supported by this file system", name);
    if (f->fd < 0) {
        int e = errno;
        if (e == EEXIST)
            return vd_err(-e, "%s: file exists", name);
        return vd_err(-e, "Could not open '%s': %s", name, strerror(e));
    }
    struct stat st;
    if (fstat(f->fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        close(f->fd);
        return vd_err(-EISDIR, "Could not open '%s': Is a directory", name);
    }
    if (oflags & O_DIRECT) {
        f->direct = true;
        f->align = probe_align(f->fd);
    }
    if (!(flags & VD_FILE_NOLOCK)) {
        int r = posix_lock(f, !(flags & VD_FILE_RDONLY));
        if (r < 0) {
            close(f->fd);
            return r;
        }
    }
    return 0;
}

static void posix_close(struct vd_file *f)
{
    if (f->fd >= 0)
        close(f->fd);
}

static bool aligned(const struct vd_file *f, const void *buf, size_t len, uint64_t off)
{
    uint64_t a = f->align;
    return ((uintptr_t)buf % a) == 0 && len % a == 0 && off % a == 0;
}

static int raw_pread(int fd, void *buf, size_t len, uint64_t off, const char *name)
{
    char *p = buf;
    while (len) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            return vd_err(-e, "%s: read of %zu bytes at offset %llu failed: %s",
                          name, len, (unsigned long long)off, strerror(e));
        }
        if (n == 0) {           /* past EOF: zeros */
            memset(p, 0, len);
            return 0;
        }
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int raw_pwrite(int fd, const void *buf, size_t len, uint64_t off, const char *name)
{
    const char *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            return vd_err(-e, "%s: write of %zu bytes at offset %llu failed: %s",
                          name, len, (unsigned long long)off, strerror(e));
        }
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int posix_pread(struct vd_file *f, void *buf, size_t len, uint64_t off)
{
    if (!f->direct || aligned(f, buf, len, off))
        return raw_pread(f->fd, buf, len, off, f->name);
    uint64_t a = f->align, start = off / a * a;
    size_t span = (size_t)(((off + len + a - 1) / a * a) - start);
    char *b = vd_alloc_aligned(span);
    if (!b)
        return -ENOMEM;
    int r = raw_pread(f->fd, b, span, start, f->name);
    if (r == 0)
        memcpy(buf, b + (off - start), len);
    free(b);
    return r;
}

static int posix_pwrite(struct vd_file *f, const void *buf, size_t len, uint64_t off)
{
    if (!f->direct || aligned(f, buf, len, off))
        return raw_pwrite(f->fd, buf, len, off, f->name);
    uint64_t a = f->align, start = off / a * a;
    size_t span = (size_t)(((off + len + a - 1) / a * a) - start);
    char *b = vd_alloc_aligned(span);
    if (!b)
        return -ENOMEM;
    pthread_mutex_lock(&f->rmw_lock);
    int r = 0;
    if (start < off || span > len)     /* head or tail partial: read them */
        r = raw_pread(f->fd, b, span, start, f->name);
    if (r == 0) {
        memcpy(b + (off - start), buf, len);
        r = raw_pwrite(f->fd, b, span, start, f->name);
    }
    pthread_mutex_unlock(&f->rmw_lock);
    free(b);
    return r;
}

static int posix_sync(struct vd_file *f)
{
    if (f->readonly)
        return 0;
    if (fdatasync(f->fd) < 0)
        return vd_err(-errno, "%s: flush failed: %s", f->name, strerror(errno));
    return 0;
}

static int posix_size(struct vd_file *f, uint64_t *size)
{
    struct stat st;
    if (fstat(f->fd, &st) < 0)
        return vd_err(-errno, "%s: stat failed: %s", f->name, strerror(errno));
    if (S_ISBLK(st.st_mode)) {
        uint64_t s;
        if (ioctl(f->fd, BLKGETSIZE64, &s) < 0)
            return vd_err(-errno, "%s: cannot get device size: %s", f->name, strerror(errno));
        *size = s;
    } else {
        *size = (uint64_t)st.st_size;
    }
    return 0;
}

static int posix_truncate(struct vd_file *f, uint64_t size)
{
    if (ftruncate(f->fd, (off_t)size) < 0)
        return vd_err(-errno, "%s: cannot resize to %llu bytes: %s", f->name,
                      (unsigned long long)size, strerror(errno));
    return 0;
}

static int falloc(struct vd_file *f, int mode, uint64_t off, uint64_t len, const char *what)
{
    if (!len)
        return 0;
    if (fallocate(f->fd, mode, (off_t)off, (off_t)len) == 0)
        return 0;
    int e = errno;
    if (e == EOPNOTSUPP || e == ENOSYS || e == EINVAL)
        return -ENOTSUP;        /* callers fall back; no message needed */
    return vd_err(-e, "%s: %s of %llu bytes at offset %llu failed: %s", f->name, what,
                  (unsigned long long)len, (unsigned long long)off, strerror(e));
}

static int posix_allocate(struct vd_file *f, uint64_t off, uint64_t len)
{
    return falloc(f, 0, off, len, "allocation");
}

static int posix_punch(struct vd_file *f, uint64_t off, uint64_t len)
{
    return falloc(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len, "hole punch");
}

static int posix_zero(struct vd_file *f, uint64_t off, uint64_t len)
{
    return falloc(f, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len, "zeroing");
}

static int posix_extent(struct vd_file *f, uint64_t off, bool *is_data, uint64_t *end)
{
    off_t d = lseek(f->fd, (off_t)off, SEEK_DATA);
    if (d < 0) {
        if (errno == ENXIO) {           /* no data from off to EOF */
            *is_data = false;
            *end = UINT64_MAX;
            return 0;
        }
        *is_data = true;                /* SEEK_DATA unsupported: all data */
        *end = UINT64_MAX;
        return 0;
    }
    if ((uint64_t)d > off) {
        *is_data = false;
        *end = (uint64_t)d;
        return 0;
    }
    off_t h = lseek(f->fd, (off_t)off, SEEK_HOLE);
    *is_data = true;
    *end = h < 0 ? UINT64_MAX : (uint64_t)h;
    return 0;
}

static uint64_t posix_allocated(struct vd_file *f)
{
    struct stat st;
    return fstat(f->fd, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

static const struct vd_proto posix_proto = {
    .name = "file",
    .open = posix_open,
    .close = posix_close,
    .pread = posix_pread,
    .pwrite = posix_pwrite,
    .sync = posix_sync,
    .size = posix_size,
    .truncate = posix_truncate,
    .allocate = posix_allocate,
    .punch = posix_punch,
    .zero = posix_zero,
    .extent = posix_extent,
    .allocated_bytes = posix_allocated,
};
