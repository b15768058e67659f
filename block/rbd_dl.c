/* librbd and librados, loaded on first use.
 *
 * Linking them costs every program start 12-15 ms (they pull in Ceph's
 * C++ libraries with their relocations and static constructors), ~40 % of
 * a whole `vdisk convert` of a small image, paid by every command whether
 * or not it names an rbd: image. Instead the functions block/proto_rbd.c
 * calls are defined here and forward to the libraries, which are opened
 * with dlopen the first time any of them is called (rados_create, when an
 * rbd: name is opened).
 *
 * The prototypes come from the libraries' headers, so a wrong one fails to
 * compile; a librbd/librados function used in proto_rbd.c but missing here
 * fails to link: add one X() line. */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <sys/types.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

/* X(return type, name, (parameters), (arguments)) */
#define RBD_FUNCS(X, V) \
    X(int, rados_create, (rados_t *cluster, const char *const id), (cluster, id)) \
    X(int, rados_conf_get, (rados_t cluster, const char *option, char *buf, size_t len), (cluster, option, buf, len)) \
    X(int, rados_conf_set, (rados_t cluster, const char *option, const char *value), (cluster, option, value)) \
    X(int, rados_conf_read_file, (rados_t cluster, const char *path), (cluster, path)) \
    X(int, rados_conf_parse_env, (rados_t cluster, const char *var), (cluster, var)) \
    X(int, rados_connect, (rados_t cluster), (cluster)) \
    X(int, rados_ioctx_create, (rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx), \
      (cluster, pool_name, ioctx)) \
    V(rados_ioctx_destroy, (rados_ioctx_t io), (io)) \
    V(rados_ioctx_set_namespace, (rados_ioctx_t io, const char *nspace), (io, nspace)) \
    V(rados_shutdown, (rados_t cluster), (cluster)) \
    X(int, rbd_create, (rados_ioctx_t io, const char *name, uint64_t size, int *order), (io, name, size, order)) \
    X(int, rbd_remove, (rados_ioctx_t io, const char *name), (io, name)) \
    X(int, rbd_open, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name), \
      (io, name, image, snap_name)) \
    X(int, rbd_open_read_only, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name), \
      (io, name, image, snap_name)) \
    X(int, rbd_close, (rbd_image_t image), (image)) \
    X(int, rbd_get_size, (rbd_image_t image, uint64_t *size), (image, size)) \
    X(int, rbd_get_features, (rbd_image_t image, uint64_t *features), (image, features)) \
    X(int, rbd_resize, (rbd_image_t image, uint64_t size), (image, size)) \
    X(int, rbd_flush, (rbd_image_t image), (image)) \
    X(ssize_t, rbd_read, (rbd_image_t image, uint64_t ofs, size_t len, char *buf), (image, ofs, len, buf)) \
    X(ssize_t, rbd_write, (rbd_image_t image, uint64_t ofs, size_t len, const char *buf), (image, ofs, len, buf)) \
    X(ssize_t, rbd_write_zeroes, (rbd_image_t image, uint64_t ofs, size_t len, int zero_flags, int op_flags), \
      (image, ofs, len, zero_flags, op_flags)) \
    X(int, rbd_diff_iterate2, (rbd_image_t image, const char *fromsnapname, uint64_t ofs, uint64_t len, \
                               uint8_t include_parent, uint8_t whole_object, \
                               int (*cb)(uint64_t, size_t, int, void *), void *arg), \
      (image, fromsnapname, ofs, len, include_parent, whole_object, cb, arg)) \
    X(ssize_t, rbd_list_lockers, (rbd_image_t image, int *exclusive, char *tag, size_t *tag_len, \
                                  char *clients, size_t *clients_len, char *cookies, size_t *cookies_len, \
                                  char *addrs, size_t *addrs_len), \
      (image, exclusive, tag, tag_len, clients, clients_len, cookies, cookies_len, addrs, addrs_len)) \
    X(int, rbd_lock_exclusive, (rbd_image_t image, const char *cookie), (image, cookie)) \
    X(int, rbd_unlock, (rbd_image_t image, const char *cookie), (image, cookie)) \
    X(int, rbd_lock_acquire, (rbd_image_t image, rbd_lock_mode_t lock_mode), (image, lock_mode)) \
    X(int, rbd_lock_get_owners, (rbd_image_t image, rbd_lock_mode_t *lock_mode, char **lock_owners, \
                                 size_t *max_lock_owners), \
      (image, lock_mode, lock_owners, max_lock_owners)) \
    V(rbd_lock_get_owners_cleanup, (char **lock_owners, size_t lock_owner_count), (lock_owners, lock_owner_count)) \
    X(int, rbd_aio_create_completion, (void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c), \
      (cb_arg, complete_cb, c)) \
    X(ssize_t, rbd_aio_get_return_value, (rbd_completion_t c), (c)) \
    V(rbd_aio_release, (rbd_completion_t c), (c)) \
    X(int, rbd_aio_readv, (rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off, \
                           rbd_completion_t c), (image, iov, iovcnt, off, c)) \
    X(int, rbd_aio_writev, (rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off, \
                            rbd_completion_t c), (image, iov, iovcnt, off, c)) \
    X(int, rbd_aio_write_zeroes, (rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c, \
                                  int zero_flags, int op_flags), (image, off, len, c, zero_flags, op_flags)) \
    X(int, rbd_aio_flush, (rbd_image_t image, rbd_completion_t c), (image, c))

#define PTR(ret, name, params, args) static __typeof__(name) *p_##name;
#define VPTR(name, params, args) PTR(void, name, params, args)
RBD_FUNCS(PTR, VPTR)

static pthread_once_t once = PTHREAD_ONCE_INIT;
static bool loaded;

static void load(void)
{
    /* librbd needs librados: opening librbd brings it in, and dlsym on
     * librbd's handle finds the symbols of both. Never closed. */
    void *h = dlopen("librbd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return;
#define SYM(ret, name, params, args) \
    if (!(p_##name = (__typeof__(name) *)dlsym(h, #name))) \
        return;
#define VSYM(name, params, args) SYM(void, name, params, args)
    RBD_FUNCS(SYM, VSYM)
    loaded = true;
}

/* false when the libraries are not installed (or lack a function) */
static bool ready(void)
{
    pthread_once(&once, load);
    return loaded;
}

/* Before a successful rados_create nothing else is called, so only that
 * one's failure is ever seen: -ELIBACC, "cannot access a needed shared
 * library", in proto_rbd.c's message. */
#define DEF(ret, name, params, args) \
    ret name params { return ready() ? p_##name args : (ret)-ELIBACC; }
#define VDEF(name, params, args) \
    void name params { if (ready()) p_##name args; }
RBD_FUNCS(DEF, VDEF)
