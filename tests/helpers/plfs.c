/* plfs: a FUSE file system that simulates a power loss (tests/crash/crash.sh -P).
 *
 *   plfs [-s seed] [-p keep_pct] [-F n] [-l log] BACKING MOUNTPOINT
 *
 * Mounts over MOUNTPOINT (an existing regular file) a file whose content is
 * BACKING's. Every change goes through to BACKING at once and is recorded
 * (tests/helpers/plfs_core.h) until the next fsync / fdatasync (or O_DSYNC
 * write) of the file, which makes BACKING durable and forgets the records.
 * No page cache in between (direct_io, no writeback cache, no attribute
 * cache): every write, read and sync of the user reaches this daemon.
 *
 *   SIGUSR1          power loss: keep each change not yet synced with
 *                    probability keep_pct% (default 50, drawn from the seed),
 *                    undo the others at sector granularity, log them,
 *                    unmount and exit (status 0 when the undo succeeded).
 *   -F n             the same power loss during the n-th fsync: it never
 *                    completes (the caller gets EIO), a deterministic point
 *                    for regression tests.
 *   SIGTERM/SIGINT   unmount and exit, everything kept.
 *
 * Once the power is lost, every request fails with EIO. Locks are left to
 * the kernel (no lock operation: it keeps OFD / POSIX locks locally). Runs in
 * the foreground; "plfs: mounted" in the log says the mount is up. */
#define FUSE_USE_VERSION 31
#include <fuse3/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include "tests/helpers/plfs_core.h"

static struct plfs_state st;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static bool dead;
static unsigned long fail_at, nsyncs;    /* -F */
static FILE *plog;

static void *pl_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    cfg->direct_io = 1;
    cfg->kernel_cache = 0;
    cfg->auto_cache = 0;
    cfg->attr_timeout = 0;
    cfg->entry_timeout = 0;
    cfg->negative_timeout = 0;
    cfg->nullpath_ok = 1;
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    return NULL;
}

static int pl_getattr(const char *path, struct stat *sb, struct fuse_file_info *fi)
{
    if (path && strcmp(path, "/"))
        return -ENOENT;
    if (fstat(st.fd, sb) < 0)
        return -errno;
    sb->st_mode = S_IFREG | 0644;
    sb->st_nlink = 1;
    return 0;
}

static int pl_open(const char *path, struct fuse_file_info *fi)
{
    if (path && strcmp(path, "/"))
        return -ENOENT;
    fi->direct_io = 1;
    fi->keep_cache = 0;
    return dead ? -EIO : 0;
}

static int pl_read(const char *path, char *buf, size_t len, off_t off, struct fuse_file_info *fi)
{
    if (dead)
        return -EIO;
    size_t got = 0;
    while (got < len) {
        ssize_t k = pread(st.fd, buf + got, len - got, off + (off_t)got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -errno;
        if (k == 0)
            break;
        got += (size_t)k;
    }
    return (int)got;
}

static int pl_write(const char *path, const char *buf, size_t len, off_t off, struct fuse_file_info *fi)
{
    pthread_mutex_lock(&mu);
    /* the kernel passes O_DSYNC for O_DSYNC files and RWF_DSYNC writes */
    int r = dead ? -EIO : plfs_write(&st, buf, len, (uint64_t)off, fi && (fi->flags & O_DSYNC));
    pthread_mutex_unlock(&mu);
    return r < 0 ? r : (int)len;
}

static int pl_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    pthread_mutex_lock(&mu);
    int r;
    if (!dead && fail_at && ++nsyncs == fail_at) {
        /* the power goes before this sync is done: main() does the loss */
        dead = true;
        fprintf(plog, "plfs: power loss during fsync #%lu\n", nsyncs);
        kill(getpid(), SIGUSR1);
        r = -EIO;
    } else {
        r = dead ? -EIO : plfs_sync(&st);
    }
    pthread_mutex_unlock(&mu);
    return r;
}

static int pl_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    pthread_mutex_lock(&mu);
    int r = dead ? -EIO : size < 0 ? -EINVAL : plfs_truncate(&st, (uint64_t)size);
    pthread_mutex_unlock(&mu);
    return r;
}

static int pl_fallocate(const char *path, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
    pthread_mutex_lock(&mu);
    int r = dead ? -EIO : off < 0 || len <= 0 ? -EINVAL : plfs_fallocate(&st, mode, (uint64_t)off, (uint64_t)len);
    pthread_mutex_unlock(&mu);
    return r;
}

static off_t pl_lseek(const char *path, off_t off, int whence, struct fuse_file_info *fi)
{
    if (dead)
        return -EIO;
    off_t r = lseek(st.fd, off, whence);
    return r < 0 ? -errno : r;
}

/* chmod / chown / utimens: accepted and ignored (the backing file's own
 * attributes are what getattr shows). */
static int pl_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) { return 0; }
static int pl_chown(const char *path, uid_t u, gid_t g, struct fuse_file_info *fi) { return 0; }
static int pl_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi) { return 0; }

static int pl_statfs(const char *path, struct statvfs *sv)
{
    return fstatvfs(st.fd, sv) < 0 ? -errno : 0;
}

static const struct fuse_operations ops = {
    .init = pl_init,
    .getattr = pl_getattr,
    .open = pl_open,
    .read = pl_read,
    .write = pl_write,
    .fsync = pl_fsync,
    .truncate = pl_truncate,
    .fallocate = pl_fallocate,
    .lseek = pl_lseek,
    .chmod = pl_chmod,
    .chown = pl_chown,
    .utimens = pl_utimens,
    .statfs = pl_statfs,
};

static struct fuse *fu;

static void *loop_main(void *arg)
{
    fuse_loop(fu);
    return NULL;
}

static void unmount(const char *mnt)
{
    if (umount2(mnt, MNT_DETACH) == 0)
        return;
    /* not root: the setuid helper */
    pid_t p = fork();
    if (p == 0) {
        execlp("fusermount3", "fusermount3", "-u", "-z", mnt, (char *)NULL);
        _exit(127);
    }
    if (p > 0)
        waitpid(p, NULL, 0);
}

int main(int argc, char **argv)
{
    uint64_t seed = 1;
    unsigned keep_pct = 50;
    const char *logname = NULL;
    int c;
    while ((c = getopt(argc, argv, "s:p:F:l:")) != -1) {
        switch (c) {
        case 's': seed = strtoull(optarg, NULL, 0); break;
        case 'p': keep_pct = (unsigned)atoi(optarg); break;
        case 'F': fail_at = strtoul(optarg, NULL, 0); break;
        case 'l': logname = optarg; break;
        default: goto usage;
        }
    }
    if (argc - optind != 2 || keep_pct > 100) {
usage:
        fprintf(stderr, "usage: plfs [-s seed] [-p keep_pct] [-F n] [-l log] BACKING MOUNTPOINT\n");
        return 2;
    }
    const char *backing = argv[optind], *mnt = argv[optind + 1];
    plog = logname ? fopen(logname, "a") : stderr;
    if (!plog) {
        perror(logname);
        return 2;
    }
    setvbuf(plog, NULL, _IOLBF, 0);
    int fd = open(backing, O_RDWR | O_CLOEXEC);
    if (fd < 0 || plfs_init(&st, fd) < 0) {
        fprintf(plog, "plfs: %s: %s\n", backing, strerror(errno));
        return 2;
    }

    /* Signals are taken by sigwait below; the FUSE thread never sees them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    char *fargv[] = { argv[0], "-o", "fsname=plfs,subtype=plfs", NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
    fu = fuse_new(&args, &ops, sizeof(ops), NULL);
    if (!fu || fuse_mount(fu, mnt) != 0) {
        fprintf(plog, "plfs: cannot mount over %s (is /dev/fuse there, and are we allowed to?)\n", mnt);
        return 1;
    }
    pthread_t th;
    if (pthread_create(&th, NULL, loop_main, NULL)) {
        fprintf(plog, "plfs: no thread\n");
        fuse_unmount(fu);
        return 1;
    }
    fprintf(plog, "plfs: mounted %s over %s, size %" PRIu64 ", seed %" PRIu64 ", keep %u%%\n", backing, mnt,
            st.size, seed, keep_pct);

    int sig = 0, rc = 0;
    sigwait(&set, &sig);
    pthread_mutex_lock(&mu);
    dead = true;            /* from now on every request fails */
    if (sig == SIGUSR1) {
        int r = plfs_power_loss(&st, seed, keep_pct, plog);
        rc = r < 0;
    } else {
        fprintf(plog, "plfs: signal %d: unmounting, %zu unsynced changes kept\n", sig, st.n);
        if (fdatasync(st.fd) < 0)
            rc = 1;
    }
    pthread_mutex_unlock(&mu);
    unmount(mnt);
    fprintf(plog, "plfs: unmounted, exit %d\n", rc);
    fflush(plog);
    /* Exiting closes /dev/fuse, which ends the connection; no teardown
     * race with the loop thread. */
    _exit(rc);
}
