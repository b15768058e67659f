/* The NBD server: the fixed-newstyle handshake and option haggling, request
 * parsing and validation (both callable on a byte buffer, so the fuzzer and
 * the unit tests drive them without sockets), and connections served on an
 * event loop (conn.c) with optional TLS (tls.c). Exports come from the
 * export table (include/vdisk/export.h): type "nbd". */
#ifndef VDISK_NBD_SERVER_H
#define VDISK_NBD_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "vdisk/loop.h"

/* Limits that bound what one client can make the server hold. */
#define VD_NBD_MAX_OPTLEN     (64u * 1024)         /* longer options: ERR_TOO_BIG, skipped */
#define VD_NBD_MAX_NAME       4096u
#define VD_NBD_MIN_BLOCK      1u
#define VD_NBD_PREF_BLOCK     4096u
#define VD_NBD_MAX_BLOCK      (32u * 1024 * 1024)
#define VD_NBD_MAX_INFLIGHT   128u                  /* requests read but not yet answered */
#define VD_NBD_MAX_INFLIGHT_BYTES (64u * 1024 * 1024)
#define VD_NBD_MAX_EXTENTS    2048u                 /* descriptors per block status reply */
#define VD_NBD_HANDSHAKE_SECONDS 60u                /* to choose an export, else closed */
#define VD_NBD_DRAIN_SECONDS  5u                    /* export removal / shutdown: to take
                                                     * the remaining replies, else closed */

enum vd_nbd_tls { VD_NBD_TLS_OFF, VD_NBD_TLS_ON, VD_NBD_TLS_REQUIRE };

/* ---- byte buffer ---- */
struct vd_buf {
    uint8_t *p;
    size_t len, cap;
};
int  vd_buf_put(struct vd_buf *b, const void *data, size_t len);
void vd_buf_consume(struct vd_buf *b, size_t n);
void vd_buf_free(struct vd_buf *b);

/* ---- handshake ---- */

/* What the handshake needs to know about an export. */
struct vd_nbd_export_info {
    uint64_t size;
    uint16_t tflags;             /* transmission flags (NBD_FLAG_*) */
    const char *name;
    const char *description;     /* NULL: none */
};

struct vd_nbd_hs_ops {
    /* Look an export up by name: returns a referenced handle or NULL,
     * filling *info (valid until close). */
    void *(*open)(void *opaque, const char *name, struct vd_nbd_export_info *info);
    void (*close)(void *opaque, void *handle);
    /* Call emit for every export (NBD_OPT_LIST). */
    void (*list)(void *opaque, void (*emit)(void *ctx, const char *name, const char *desc), void *ctx);
};

enum vd_nbd_hs_result {
    VD_NBD_HS_MORE,        /* feed more input (after sending hs->out) */
    VD_NBD_HS_STARTTLS,    /* send hs->out, then run the TLS handshake, then vd_nbd_hs_tls_done */
    VD_NBD_HS_DONE,        /* enter transmission: hs->export, hs->info, hs->structured, hs->meta_* */
    VD_NBD_HS_CLOSE,       /* send hs->out (best effort) and close */
};

struct vd_nbd_hs {
    /* configuration */
    const struct vd_nbd_hs_ops *ops;
    void *opaque;
    enum vd_nbd_tls tls;        /* OFF: STARTTLS refused */
    /* parser state */
    int state;
    uint8_t hdr[16];
    size_t hdr_got;
    uint32_t opt, optlen;
    uint8_t *data;
    size_t data_got;
    uint64_t skip;               /* bytes of an oversized option still to drop */
    uint32_t client_flags;
    bool tls_active;
    /* negotiated */
    bool structured;
    bool meta_alloc, meta_depth; /* contexts selected by SET_META_CONTEXT */
    char *meta_export;           /* ... for this export name */
    /* output: bytes to send to the client */
    struct vd_buf out;
    /* result of DONE */
    void *export;
    struct vd_nbd_export_info info;
    const char *close_reason;    /* with CLOSE: why (for the log) */
};

/* Start a handshake; queues the greeting in hs->out. */
void vd_nbd_hs_init(struct vd_nbd_hs *hs, const struct vd_nbd_hs_ops *ops, void *opaque,
                    enum vd_nbd_tls tls);
/* Consume input; *used says how much of buf was taken (the rest belongs
 * to what follows: TLS bytes, or transmission requests after DONE). */
enum vd_nbd_hs_result vd_nbd_hs_input(struct vd_nbd_hs *hs, const uint8_t *buf, size_t len,
                                      size_t *used);
/* The TLS session is up: option haggling starts again, encrypted. */
void vd_nbd_hs_tls_done(struct vd_nbd_hs *hs);
/* Release everything (and the export handle unless taken: set hs->export = NULL). */
void vd_nbd_hs_free(struct vd_nbd_hs *hs);

/* ---- transmission requests ---- */

struct vd_nbd_request {
    uint16_t flags, type;
    uint64_t cookie, off;
    uint32_t len;
};

/* The negotiated session a request is checked against. */
struct vd_nbd_session {
    uint64_t size;
    uint16_t tflags;
    bool structured;
    bool meta_alloc, meta_depth;
};

/* Parse a 28-byte request header; -EBADMSG when the magic is wrong (the
 * connection cannot be resynchronised and must close). */
int vd_nbd_request_parse(const uint8_t hdr[28], struct vd_nbd_request *r);
/* Bytes of payload that follow the header on the wire. */
uint32_t vd_nbd_request_payload(const struct vd_nbd_request *r);
/* 0 when the request may run, else the NBD error to reply (and *why a
 * message for a structured error chunk). */
int vd_nbd_request_check(const struct vd_nbd_request *r, const struct vd_nbd_session *s,
                         const char **why);
const char *vd_nbd_cmd_name(uint16_t type);

/* ---- the server ---- */

struct vd_nbd_tls_ctx;
/* X.509: cert + key (+ ca: verify clients, required when verify_peer);
 * PSK: a psktool file ("identity:hexkey" lines). */
struct vd_nbd_tls_config {
    const char *cert, *key, *ca, *psk_file;
    bool verify_peer;
};
int  vd_nbd_tls_new(const struct vd_nbd_tls_config *cfg, struct vd_nbd_tls_ctx **out);
void vd_nbd_tls_free(struct vd_nbd_tls_ctx *t);

struct vd_nbd_server_config {
    enum vd_nbd_tls tls;
    struct vd_nbd_tls_ctx *tls_ctx;     /* required unless tls == OFF */
    unsigned max_inflight;              /* 0: VD_NBD_MAX_INFLIGHT */
    unsigned handshake_seconds;         /* 0: VD_NBD_HANDSHAKE_SECONDS */
    unsigned drain_seconds;             /* 0: VD_NBD_DRAIN_SECONDS */
    void (*on_idle)(void *opaque);      /* stdio mode: the last connection closed */
    void *on_idle_opaque;
};
/* One server per process: set its configuration (before serving). */
void vd_nbd_server_configure(const struct vd_nbd_server_config *cfg);
/* Serve one connected client; must be called on loop's thread. rfd and
 * wfd may be the same socket. Takes ownership of the descriptors. */
void vd_nbd_serve(struct vd_loop *loop, int rfd, int wfd, const char *peer);
/* Live connections (all loops). */
unsigned vd_nbd_connections(void);
/* Close every connection once the requests its client has sent are done
 * and their replies sent (shutdown; a client that does not read is cut
 * off after drain_seconds); returns when all are closed. */
void vd_nbd_close_all(void);

#endif
