/*
 * cbor.h: the little CBOR (RFC 8949) a trioscsi emulator needs, as static inline functions.
 *
 * Encoding appends to a growable `struct buf`.  Decoding walks a `struct cur` over one frame: read a head,
 * read a typed value, or skip any item (nested arrays, maps, tags, floats, indefinite lengths).  Nothing is
 * allocated while decoding: byte and text strings are returned as pointers into the frame.
 */
#ifndef RAMDISK_CBOR_H
#define RAMDISK_CBOR_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- encoding ------------------------------------------------------------------------------------------- */

struct buf {
    uint8_t *p;
    size_t len, cap;
};

static inline void buf_put(struct buf *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p)
            abort();
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

/* A head: major type (0..7) and its argument, in the shortest form (preferred serialization). */
static inline void cbor_head(struct buf *b, int major, uint64_t v)
{
    uint8_t h[9];
    size_t n;
    if (v < 24) {
        h[0] = (uint8_t)(major << 5 | v);
        n = 1;
    } else if (v <= 0xFF) {
        h[0] = (uint8_t)(major << 5 | 24);
        h[1] = (uint8_t)v;
        n = 2;
    } else if (v <= 0xFFFF) {
        h[0] = (uint8_t)(major << 5 | 25);
        h[1] = (uint8_t)(v >> 8);
        h[2] = (uint8_t)v;
        n = 3;
    } else if (v <= 0xFFFFFFFFu) {
        h[0] = (uint8_t)(major << 5 | 26);
        for (int i = 0; i < 4; i++)
            h[1 + i] = (uint8_t)(v >> (24 - 8 * i));
        n = 5;
    } else {
        h[0] = (uint8_t)(major << 5 | 27);
        for (int i = 0; i < 8; i++)
            h[1 + i] = (uint8_t)(v >> (56 - 8 * i));
        n = 9;
    }
    buf_put(b, h, n);
}

static inline void cbor_uint(struct buf *b, uint64_t v) { cbor_head(b, 0, v); }
static inline void cbor_map(struct buf *b, uint64_t pairs) { cbor_head(b, 5, pairs); }
static inline void cbor_array(struct buf *b, uint64_t items) { cbor_head(b, 4, items); }
static inline void cbor_bool(struct buf *b, int v) { cbor_head(b, 7, v ? 21 : 20); }

static inline void cbor_text(struct buf *b, const char *s)
{
    size_t n = strlen(s);
    cbor_head(b, 3, n);
    buf_put(b, s, n);
}

static inline void cbor_bytes(struct buf *b, const void *p, size_t n)
{
    cbor_head(b, 2, n);
    buf_put(b, p, n);
}

/* ---- decoding ------------------------------------------------------------------------------------------- */

struct cur {
    const uint8_t *p, *end;
};

#define CBOR_INDEFINITE UINT64_MAX

/* Read one head. Returns 0, or -1 when the bytes are not CBOR. An indefinite length gives CBOR_INDEFINITE. */
static inline int cbor_read_head(struct cur *c, int *major, uint64_t *v)
{
    if (c->p >= c->end)
        return -1;
    uint8_t b = *c->p++;
    int ai = b & 31;
    *major = b >> 5;
    if (ai < 24) {
        *v = (uint64_t)ai;
        return 0;
    }
    if (ai <= 27) {
        size_t n = (size_t)1 << (ai - 24);
        if ((size_t)(c->end - c->p) < n)
            return -1;
        *v = 0;
        for (size_t i = 0; i < n; i++)
            *v = *v << 8 | *c->p++;
        return 0;
    }
    if (ai == 31 && (*major >= 2 && *major <= 5)) {
        *v = CBOR_INDEFINITE;
        return 0;
    }
    if (ai == 31 && *major == 7) { /* "break": only valid inside an indefinite item */
        *v = CBOR_INDEFINITE;
        return 0;
    }
    return -1;
}

static inline int cbor_at_break(const struct cur *c) { return c->p < c->end && *c->p == 0xFF; }

/* Skip one complete item of any type. */
static inline int cbor_skip(struct cur *c, int depth)
{
    int major;
    uint64_t v;
    if (depth > 64 || cbor_read_head(c, &major, &v))
        return -1;
    switch (major) {
    case 0:
    case 1:
        return 0;
    case 2:
    case 3:
        if (v == CBOR_INDEFINITE) {
            while (!cbor_at_break(c))
                if (cbor_skip(c, depth + 1))
                    return -1;
            c->p++;
            return 0;
        }
        if (v > (uint64_t)(c->end - c->p))
            return -1;
        c->p += v;
        return 0;
    case 4:
    case 5: {
        int per = major == 5 ? 2 : 1;
        if (v == CBOR_INDEFINITE) {
            while (!cbor_at_break(c))
                for (int i = 0; i < per; i++)
                    if (cbor_skip(c, depth + 1))
                        return -1;
            if (c->p >= c->end)
                return -1;
            c->p++;
            return 0;
        }
        for (uint64_t i = 0; i < v * per; i++)
            if (cbor_skip(c, depth + 1))
                return -1;
        return 0;
    }
    case 6:
        return cbor_skip(c, depth + 1); /* a tag: skip the item it tags */
    default:
        return v == CBOR_INDEFINITE ? -1 : 0; /* simple values and floats: the head was all */
    }
}

static inline int cbor_get_uint(struct cur *c, uint64_t *out)
{
    int major;
    return cbor_read_head(c, &major, out) || major != 0 ? -1 : 0;
}

static inline int cbor_get_bool(struct cur *c, int *out)
{
    int major;
    uint64_t v;
    if (cbor_read_head(c, &major, &v) || major != 7 || (v != 20 && v != 21))
        return -1;
    *out = v == 21;
    return 0;
}

/* A definite-length byte (major 2) or text (major 3) string, as a pointer into the frame. */
static inline int cbor_get_string(struct cur *c, int want_major, const uint8_t **p, size_t *n)
{
    int major;
    uint64_t v;
    if (cbor_read_head(c, &major, &v) || major != want_major || v == CBOR_INDEFINITE ||
        v > (uint64_t)(c->end - c->p))
        return -1;
    *p = c->p;
    *n = (size_t)v;
    c->p += v;
    return 0;
}

/*
 * Iterate a map with text keys:
 *     struct cbor_map m; if (cbor_map_begin(&cur, &m)) error;
 *     while ((r = cbor_map_next(&cur, &m, &key, &keylen)) > 0) { read or cbor_skip the value }
 *     if (r < 0) error;
 */
struct cbor_map {
    uint64_t left; /* pairs left, or CBOR_INDEFINITE */
};

static inline int cbor_map_begin(struct cur *c, struct cbor_map *m)
{
    int major;
    return cbor_read_head(c, &major, &m->left) || major != 5 ? -1 : 0;
}

static inline int cbor_map_next(struct cur *c, struct cbor_map *m, const uint8_t **key, size_t *keylen)
{
    if (m->left == CBOR_INDEFINITE) {
        if (cbor_at_break(c)) {
            c->p++;
            return 0;
        }
    } else if (m->left-- == 0) {
        return 0;
    }
    return cbor_get_string(c, 3, key, keylen) ? -1 : 1;
}

static inline int cbor_key_is(const uint8_t *key, size_t keylen, const char *name)
{
    return keylen == strlen(name) && memcmp(key, name, keylen) == 0;
}

#endif
