/*
 * sbc.c: the SCSI commands of the RAM disk (SPC-4 / SBC-3), one function per command, dispatched by opcode in
 * execute().  Nothing here knows about the protocol: a CDB and data-out buffer in, a `struct result` out.
 * Errors are CHECK CONDITION with fixed-format sense (our control mode page says D_SENSE = 0).
 */
#include <string.h>

#include "ramdisk.h"

/* SCSI status, sense keys and additional sense codes (ASC << 8 | ASCQ) */
enum { GOOD = 0x00, CHECK_CONDITION = 0x02 };
enum { NO_SENSE = 0x0, ILLEGAL_REQUEST = 0x5, DATA_PROTECT = 0x7 };
enum {
    INVALID_OPCODE = 0x2000,
    LBA_OUT_OF_RANGE = 0x2100,
    INVALID_FIELD_IN_CDB = 0x2400,
    WRITE_PROTECTED = 0x2700,
    SAVING_PARAMS_UNSUPPORTED = 0x3900,
};

static uint32_t be16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

static void put_be(uint8_t *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static void check_condition(struct result *r, uint8_t key, uint16_t asc)
{
    r->status = CHECK_CONDITION;
    memset(r->sense, 0, sizeof r->sense);
    r->sense[0] = 0x70; /* fixed format, current error; our control mode page has D_SENSE = 0 */
    r->sense[2] = key;
    r->sense[7] = 10;
    r->sense[12] = (uint8_t)(asc >> 8);
    r->sense[13] = (uint8_t)asc;
    r->sense_len = 18;
    r->data_len = 0;
}

static void reply(struct result *r, size_t len, size_t alloc)
{
    r->data = r->reply;
    r->data_len = len < alloc ? len : alloc;
}

/* ASCII field: left-aligned, space-padded, never NUL (SPC-4). */
static void ascii(uint8_t *p, const char *s, size_t width)
{
    size_t n = strlen(s);
    memset(p, ' ', width);
    memcpy(p, s, n < width ? n : width);
}

static void inquiry(const uint8_t *cdb, struct result *r)
{
    uint8_t *p = r->reply;
    size_t alloc = be16(cdb + 3), n;
    memset(p, 0, sizeof r->reply);
    if (cdb[1] & 0x02 || (!(cdb[1] & 0x01) && cdb[2])) /* CMDDT, or a page code without EVPD */
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    if (!(cdb[1] & 0x01)) {
        p[2] = 0x06;       /* SPC-4 */
        p[3] = 0x12;       /* HISUP, response data format 2 */
        p[4] = 36 - 5;     /* additional length */
        p[7] = 0x02;       /* CMDQUE */
        ascii(p + 8, d.vendor, 8);
        ascii(p + 16, d.product, 16);
        ascii(p + 32, d.revision, 4);
        return reply(r, 36, alloc);
    }
    p[1] = cdb[2];
    switch (cdb[2]) {
    case 0x00: /* supported VPD pages, ascending */
        memcpy(p + 4, "\x00\x80\x83\xb0", 4);
        n = 4;
        break;
    case 0x80: /* unit serial number */
        n = strlen(d.serial);
        memcpy(p + 4, d.serial, n);
        break;
    case 0x83: /* device identification: NAA (binary) and T10 vendor ID (ASCII), both of the logical unit */
        n = 0;
        if (d.naa_len) {
            p[4] = 0x01;                   /* code set binary */
            p[5] = 0x03;                   /* association LU, designator type NAA */
            p[7] = (uint8_t)d.naa_len;
            memcpy(p + 8, d.naa, d.naa_len);
            n = 4 + d.naa_len;
        }
        {
            size_t sl = strlen(d.serial) > 64 ? 64 : strlen(d.serial);
            p[4 + n] = 0x02;               /* code set ASCII */
            p[5 + n] = 0x01;               /* association LU, designator type T10 vendor ID */
            p[7 + n] = (uint8_t)(8 + sl);
            ascii(p + 8 + n, d.vendor, 8);
            memcpy(p + 16 + n, d.serial, sl);
            n += 4 + 8 + sl;
        }
        break;
    case 0xB0: /* block limits: tell initiators the largest transfer we take in one command */
        n = 0x3C;
        put_be(p + 8, MAX_IO / d.block_size, 4);          /* MAXIMUM TRANSFER LENGTH */
        put_be(p + 12, (1u << 20) / d.block_size, 4);     /* OPTIMAL TRANSFER LENGTH */
        break;
    default:
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    }
    put_be(p + 2, n, 2);
    reply(r, 4 + n, alloc);
}

static void read_capacity(const uint8_t *cdb, struct result *r, int sixteen)
{
    memset(r->reply, 0, 32);
    if (!sixteen) {
        put_be(r->reply, d.blocks - 1 > 0xFFFFFFFFu ? 0xFFFFFFFFu : d.blocks - 1, 4);
        put_be(r->reply + 4, d.block_size, 4);
        return reply(r, 8, 8);
    }
    put_be(r->reply, d.blocks - 1, 8);
    put_be(r->reply + 8, d.block_size, 4);
    reply(r, 32, be32(cdb + 10));
}

/* Is [lba, lba + count) on the disk?  Written so that it cannot overflow. */
static int in_range(uint64_t lba, uint64_t count) { return lba <= d.blocks && count <= d.blocks - lba; }

static void read_write(const uint8_t *cdb, size_t cdb_len, const uint8_t *data, size_t data_len, struct result *r)
{
    int sixteen = cdb[0] == 0x88 || cdb[0] == 0x8A, write = cdb[0] == 0x2A || cdb[0] == 0x8A;
    if (cdb_len < (sixteen ? 16u : 10u) || cdb[1] >> 5) /* truncated CDB, or protection information asked */
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    uint64_t lba = sixteen ? be64(cdb + 2) : be32(cdb + 2);
    uint64_t count = sixteen ? be32(cdb + 10) : be16(cdb + 7);
    if (!in_range(lba, count))
        return check_condition(r, ILLEGAL_REQUEST, LBA_OUT_OF_RANGE);
    if (count * d.block_size > MAX_IO)
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    uint8_t *at = d.ram + lba * d.block_size;
    size_t bytes = (size_t)count * d.block_size;
    if (!write) {
        r->data = at;
        r->data_len = bytes;
        return;
    }
    if (d.read_only)
        return check_condition(r, DATA_PROTECT, WRITE_PROTECTED);
    if (data_len < bytes) /* the initiator sent less than the CDB asks: write nothing rather than part */
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    memcpy(at, data, bytes);
}

static void synchronize_cache(const uint8_t *cdb, size_t cdb_len, struct result *r)
{
    int sixteen = cdb[0] == 0x91;
    if (cdb_len < (sixteen ? 16u : 10u))
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    uint64_t lba = sixteen ? be64(cdb + 2) : be32(cdb + 2);
    uint64_t count = sixteen ? be32(cdb + 10) : be16(cdb + 7);
    if (!in_range(lba, count))
        return check_condition(r, ILLEGAL_REQUEST, LBA_OUT_OF_RANGE);
    /* RAM is as durable as it gets: nothing to flush */
}

static void mode_sense6(const uint8_t *cdb, struct result *r)
{
    int page = cdb[2] & 0x3F, control = cdb[2] >> 6; /* current, changeable and default values are all zero */
    uint8_t *p = r->reply;
    size_t n = 4;
    if (control == 3)
        return check_condition(r, ILLEGAL_REQUEST, SAVING_PARAMS_UNSUPPORTED);
    if ((page != 0x08 && page != 0x0A && page != 0x3F) || (cdb[3] && !(page == 0x3F && cdb[3] == 0xFF)))
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    memset(p, 0, 255);
    p[2] = d.read_only ? 0x80 : 0x00; /* WP */
    if (!(cdb[1] & 0x08)) {           /* DBD = 0: one short block descriptor */
        p[3] = 8;
        put_be(p + 4, d.blocks > 0xFFFFFFFFu ? 0xFFFFFFFFu : d.blocks, 4);
        put_be(p + 9, d.block_size, 3);
        n += 8;
    }
    if (page == 0x08 || page == 0x3F) { /* caching: no write cache (WCE = 0), nothing changeable */
        p[n] = 0x08;
        p[n + 1] = 0x12;
        n += 20;
    }
    if (page == 0x0A || page == 0x3F) { /* control: D_SENSE = 0 (fixed-format sense) */
        p[n] = 0x0A;
        p[n + 1] = 0x0A;
        n += 12;
    }
    p[0] = (uint8_t)(n - 1);
    reply(r, n, cdb[4]);
}

void execute(const uint8_t *cdb, size_t cdb_len, const uint8_t *data, size_t data_len, struct result *r)
{
    r->status = GOOD;
    r->sense_len = r->data_len = 0;
    static const uint8_t length_of_group[8] = {6, 10, 10, 0, 16, 12, 0, 0};
    if (cdb_len < 6 || cdb_len < length_of_group[cdb[0] >> 5])
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    switch (cdb[0]) {
    case 0x00: /* TEST UNIT READY: always ready */
        return;
    case 0x03: /* REQUEST SENSE: nothing pending, so NO SENSE (fixed format, or descriptor if DESC) */
        memset(r->reply, 0, 18);
        if (cdb[1] & 0x01) {
            r->reply[0] = 0x72;
            return reply(r, 8, cdb[4]);
        }
        r->reply[0] = 0x70;
        r->reply[2] = NO_SENSE;
        r->reply[7] = 10;
        return reply(r, 18, cdb[4]);
    case 0x12:
        return inquiry(cdb, r);
    case 0x1A:
        return mode_sense6(cdb, r);
    case 0x25:
        return read_capacity(cdb, r, 0);
    case 0x9E:
        if ((cdb[1] & 0x1F) == 0x10)
            return read_capacity(cdb, r, 1);
        return check_condition(r, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB); /* another service action */
    case 0x28:
    case 0x2A:
    case 0x88:
    case 0x8A:
        return read_write(cdb, cdb_len, data, data_len, r);
    case 0x35:
    case 0x91:
        return synchronize_cache(cdb, cdb_len, r);
    default:
        return check_condition(r, ILLEGAL_REQUEST, INVALID_OPCODE);
    }
}

