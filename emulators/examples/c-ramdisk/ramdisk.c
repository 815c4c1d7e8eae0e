/*
 * ramdisk: a RAM-backed SCSI disk for trioscsi, written from docs/emulator-protocol.md alone.
 *
 * The protocol: length-prefixed CBOR maps on stdin (from the core) and stdout (to the core), logs on stderr.
 * This emulator is single-threaded and answers every command before it reads the next frame, so an `abort`
 * always names a command that is already answered (the protocol says: ignore it) and a `ping` is answered as
 * soon as it is read.  READ data goes from the RAM buffer to the pipe with writev(), without a copy.
 *
 * hello.params: size (bytes, default 64 MiB), block_size (512 or 4096, default 512), read_only (bool).
 * This file is the protocol side (frames, hello/ready, cmd/done, ping/pong); sbc.c executes the CDBs.
 * SCSI: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard, VPD 0x00 0x80 0x83 0xB0), READ CAPACITY(10/16),
 * READ/WRITE(10/16), SYNCHRONIZE CACHE(10/16), MODE SENSE(6).  Everything else gets ILLEGAL REQUEST, INVALID
 * COMMAND OPERATION CODE; REPORT LUNS, reservations and unit attentions are the core's.
 */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cbor.h"
#include "ramdisk.h"

#define MAX_FRAME (16u * 1024 * 1024 + 4096)
#define MAX_INFLIGHT 64

struct disk d = {.block_size = 512, .vendor = "TRIOSCSI", .product = "c-ramdisk", .revision = "0001",
                 .serial = "ramdisk"};

static void logf_(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ramdisk: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ---- frames ------------------------------------------------------------------------------------------- */

static int write_all(struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t w = writev(STDOUT_FILENO, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* Send one frame: `b` holds 4 bytes of room for the length, then CBOR; `tail` (may be empty) follows it. */
static void send_frame(struct buf *b, const void *tail, size_t tail_len)
{
    uint32_t len = (uint32_t)(b->len - 4 + tail_len);
    b->p[0] = (uint8_t)(len >> 24);
    b->p[1] = (uint8_t)(len >> 16);
    b->p[2] = (uint8_t)(len >> 8);
    b->p[3] = (uint8_t)len;
    struct iovec iov[2] = {{b->p, b->len}, {(void *)tail, tail_len}};
    if (write_all(iov, tail_len ? 2 : 1)) {
        logf_("cannot write to stdout: %s", strerror(errno));
        exit(1);
    }
}

static struct buf out;

static void frame_start(void)
{
    out.len = 0;
    buf_put(&out, "\0\0\0\0", 4);
}

static void send_error(const char *message)
{
    logf_("protocol error: %s", message);
    frame_start();
    cbor_map(&out, 2);
    cbor_text(&out, "op");
    cbor_text(&out, "error");
    cbor_text(&out, "message");
    cbor_text(&out, message);
    send_frame(&out, NULL, 0);
}

/* 1: got n bytes; 0: end of input before the first byte; -1: end of input or an error part-way. */
static int read_full(uint8_t *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(STDIN_FILENO, p + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return got == 0 && r == 0 ? 0 : -1;
        got += (size_t)r;
    }
    return 1;
}

/* ---- messages ------------------------------------------------------------------------------------------ */

static struct buf identity_cbor; /* hello.identity exactly as received, echoed in ready */

static void copy_text(char *dst, size_t cap, const uint8_t *s, size_t n)
{
    n = n < cap - 1 ? n : cap - 1;
    memcpy(dst, s, n);
    dst[n] = 0;
}

static int parse_identity(struct cur *c)
{
    const uint8_t *start = c->p, *key, *s;
    size_t klen, n;
    struct cbor_map m;
    int r;
    if (cbor_map_begin(c, &m))
        return -1;
    while ((r = cbor_map_next(c, &m, &key, &klen)) > 0) {
        char *dst = cbor_key_is(key, klen, "vendor")     ? d.vendor
                    : cbor_key_is(key, klen, "product")  ? d.product
                    : cbor_key_is(key, klen, "revision") ? d.revision
                    : cbor_key_is(key, klen, "serial")   ? d.serial
                                                         : NULL;
        size_t cap = dst == d.vendor ? 9 : dst == d.product ? 17 : dst == d.revision ? 5 : sizeof d.serial;
        if (dst) {
            if (cbor_get_string(c, 3, &s, &n))
                return -1;
            copy_text(dst, cap, s, n);
        } else if (cbor_key_is(key, klen, "naa")) {
            if (cbor_get_string(c, 2, &s, &n) || (n != 8 && n != 16))
                return -1;
            memcpy(d.naa, s, n);
            d.naa_len = n;
        } else if (cbor_skip(c, 0)) {
            return -1;
        }
    }
    identity_cbor.len = 0;
    buf_put(&identity_cbor, start, (size_t)(c->p - start));
    return r;
}

static int parse_params(struct cur *c, uint64_t *size)
{
    const uint8_t *key;
    size_t klen;
    struct cbor_map m;
    uint64_t v;
    int r;
    if (cbor_map_begin(c, &m))
        return -1;
    while ((r = cbor_map_next(c, &m, &key, &klen)) > 0) {
        if (cbor_key_is(key, klen, "size")) {
            if (cbor_get_uint(c, size))
                return -1;
        } else if (cbor_key_is(key, klen, "block_size")) {
            if (cbor_get_uint(c, &v) || (v != 512 && v != 4096))
                return -1;
            d.block_size = (uint32_t)v;
        } else if (cbor_key_is(key, klen, "read_only")) {
            if (cbor_get_bool(c, &d.read_only))
                return -1;
        } else {
            logf_("ignoring unknown parameter '%.*s'", (int)klen, (const char *)key);
            if (cbor_skip(c, 0))
                return -1;
        }
    }
    return r;
}

static void handle_hello(struct cur *c, struct cbor_map *m)
{
    const uint8_t *key;
    size_t klen;
    uint64_t size = 64u << 20, v;
    int r, have_v1 = 0;
    while ((r = cbor_map_next(c, m, &key, &klen)) > 0) {
        if (cbor_key_is(key, klen, "versions")) {
            uint64_t items;
            int major;
            if (cbor_read_head(c, &major, &items) || major != 4)
                goto bad;
            int indefinite = items == CBOR_INDEFINITE;
            while (indefinite ? !cbor_at_break(c) : items-- > 0) {
                if (cbor_get_uint(c, &v))
                    goto bad;
                have_v1 |= v == 1;
            }
            if (indefinite)
                c->p++;
        } else if (cbor_key_is(key, klen, "params")) {
            if (parse_params(c, &size))
                goto bad_params;
        } else if (cbor_key_is(key, klen, "identity")) {
            if (parse_identity(c))
                goto bad;
        } else if (cbor_skip(c, 0)) {
            goto bad;
        }
    }
    if (r < 0)
        goto bad;
    if (!have_v1) {
        send_error("no common protocol version (this emulator speaks [1])");
        exit(2);
    }
    d.blocks = size / d.block_size;
    if (d.blocks == 0 || !(d.ram = calloc(d.blocks, d.block_size))) {
        send_error("params.size must be at least one block and fit in memory");
        exit(1);
    }
    frame_start();
    cbor_map(&out, 7 - (identity_cbor.len == 0));
    cbor_text(&out, "op");
    cbor_text(&out, "ready");
    cbor_text(&out, "version");
    cbor_uint(&out, 1);
    cbor_text(&out, "device_type");
    cbor_uint(&out, 0);
    if (identity_cbor.len) {
        cbor_text(&out, "identity");
        buf_put(&out, identity_cbor.p, identity_cbor.len);
    }
    cbor_text(&out, "capacity");
    cbor_map(&out, 2);
    cbor_text(&out, "block_size");
    cbor_uint(&out, d.block_size);
    cbor_text(&out, "blocks");
    cbor_uint(&out, d.blocks);
    cbor_text(&out, "features");
    cbor_array(&out, d.read_only ? 1 : 0);
    if (d.read_only)
        cbor_text(&out, "read_only");
    cbor_text(&out, "max_inflight");
    cbor_uint(&out, MAX_INFLIGHT);
    send_frame(&out, NULL, 0);
    logf_("ready: %llu blocks of %u bytes%s", (unsigned long long)d.blocks, d.block_size,
          d.read_only ? ", read-only" : "");
    return;
bad_params:
    send_error("bad params: size is a byte count, block_size 512 or 4096, read_only true or false");
    exit(1);
bad:
    send_error("malformed hello");
    exit(1);
}

static void handle_cmd(struct cur *c, struct cbor_map *m)
{
    static struct result res;
    const uint8_t *key, *cdb = NULL, *data = NULL;
    size_t klen, cdb_len = 0, data_len = 0;
    uint64_t tag = 0;
    int r, have_tag = 0;
    while ((r = cbor_map_next(c, m, &key, &klen)) > 0) {
        if (cbor_key_is(key, klen, "tag")) {
            if (cbor_get_uint(c, &tag))
                return send_error("cmd.tag is not an unsigned integer");
            have_tag = 1;
        } else if (cbor_key_is(key, klen, "cdb")) {
            if (cbor_get_string(c, 2, &cdb, &cdb_len))
                return send_error("cmd.cdb is not a byte string");
        } else if (cbor_key_is(key, klen, "data")) {
            if (cbor_get_string(c, 2, &data, &data_len))
                return send_error("cmd.data is not a byte string");
        } else if (cbor_skip(c, 0)) { /* xfer, lun, attr and unknown keys: not needed here */
            return send_error("malformed cmd");
        }
    }
    if (r < 0 || !have_tag)
        return send_error("cmd without a tag");
    if (cdb)
        execute(cdb, cdb_len, data, data_len, &res);
    else
        execute((const uint8_t *)"", 0, NULL, 0, &res); /* no cdb: answered like a truncated one */

    frame_start();
    int extra = res.sense_len || res.data_len;
    cbor_map(&out, 3 + extra);
    cbor_text(&out, "op");
    cbor_text(&out, "done");
    cbor_text(&out, "tag");
    cbor_uint(&out, tag);
    cbor_text(&out, "status");
    cbor_uint(&out, res.status);
    if (res.sense_len) {
        cbor_text(&out, "sense");
        cbor_bytes(&out, res.sense, res.sense_len);
    } else if (res.data_len) { /* the data goes last, so that writev() can send it straight from RAM */
        cbor_text(&out, "data");
        cbor_head(&out, 2, res.data_len);
        return send_frame(&out, res.data, res.data_len);
    }
    send_frame(&out, NULL, 0);
}

static void handle_ping(struct cur *c, struct cbor_map *m)
{
    const uint8_t *key;
    size_t klen;
    uint64_t tag = 0;
    while (cbor_map_next(c, m, &key, &klen) > 0)
        if (cbor_key_is(key, klen, "tag") ? cbor_get_uint(c, &tag) : cbor_skip(c, 0))
            return send_error("malformed ping");
    frame_start();
    cbor_map(&out, 2);
    cbor_text(&out, "op");
    cbor_text(&out, "pong");
    cbor_text(&out, "tag");
    cbor_uint(&out, tag);
    send_frame(&out, NULL, 0);
}

/* One frame.  "op" is found first by a scan, then the map is read again by the handler for that op. */
static void handle_frame(const uint8_t *p, size_t len, int *said_hello)
{
    struct cur c = {p, p + len}, scan = c;
    struct cbor_map m;
    const uint8_t *key, *op = NULL;
    size_t klen, oplen = 0;
    int r;
    if (cbor_map_begin(&scan, &m))
        return send_error("a frame is not a CBOR map");
    while ((r = cbor_map_next(&scan, &m, &key, &klen)) > 0) {
        if (cbor_key_is(key, klen, "op")) {
            if (cbor_get_string(&scan, 3, &op, &oplen))
                return send_error("op is not text");
        } else if (cbor_skip(&scan, 0)) {
            return send_error("a frame is not valid CBOR");
        }
    }
    if (r < 0 || !op)
        return send_error("a frame without an op");
    cbor_map_begin(&c, &m);
    if (!*said_hello) {
        if (!cbor_key_is(op, oplen, "hello")) {
            send_error("the first frame must be hello");
            exit(1);
        }
        *said_hello = 1;
        return handle_hello(&c, &m);
    }
    if (cbor_key_is(op, oplen, "cmd"))
        return handle_cmd(&c, &m);
    if (cbor_key_is(op, oplen, "ping"))
        return handle_ping(&c, &m);
    if (cbor_key_is(op, oplen, "abort")) /* every command is answered before the next frame is read */
        return;
    if (cbor_key_is(op, oplen, "error"))
        return logf_("the core reports a protocol error");
    logf_("ignoring a frame with unknown op '%.*s'", (int)oplen, (const char *)op);
}

int main(void)
{
    static struct buf in;
    uint8_t head[4];
    int said_hello = 0, r;
    while ((r = read_full(head, 4)) > 0) {
        uint32_t len = (uint32_t)head[0] << 24 | (uint32_t)head[1] << 16 | (uint32_t)head[2] << 8 | head[3];
        if (len > MAX_FRAME) {
            send_error("frame longer than max_frame");
            return 1;
        }
        if (len > in.cap) {
            free(in.p);
            if (!(in.p = malloc(len)))
                abort();
            in.cap = len;
        }
        if (read_full(in.p, len) <= 0) {
            logf_("stdin ended inside a frame");
            return 1;
        }
        handle_frame(in.p, len, &said_hello);
    }
    if (r < 0) {
        logf_("stdin ended inside a frame header");
        return 1;
    }
    logf_("end of input: exiting");
    return 0;
}
