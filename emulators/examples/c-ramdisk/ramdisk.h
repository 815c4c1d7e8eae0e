/*
 * ramdisk.h: what the protocol side (ramdisk.c) and the SCSI side (sbc.c) of the RAM disk share.
 */
#ifndef RAMDISK_H
#define RAMDISK_H

#include <stddef.h>
#include <stdint.h>

#define MAX_IO (8u * 1024 * 1024) /* largest READ/WRITE we accept, well inside one 16 MiB frame */

/* The logical unit: its memory, geometry and the identity the core gave in hello. */
struct disk {
    uint8_t *ram;
    uint64_t blocks;
    uint32_t block_size;
    int read_only;
    char vendor[9], product[17], revision[5], serial[256];
    uint8_t naa[16];
    size_t naa_len;
};

extern struct disk d;

/* The result of one command: status, sense, and data-in (pointing into `reply` or into the RAM disk). */
struct result {
    uint8_t status;
    uint8_t sense[18];
    size_t sense_len;
    const uint8_t *data;
    size_t data_len;
    uint8_t reply[512];
};

/* Execute one CDB (with its data-out buffer) against `d`. */
void execute(const uint8_t *cdb, size_t cdb_len, const uint8_t *data, size_t data_len, struct result *r);

#endif
