"""The NBD transport: a Network Block Device server in front of the SCSI core (docs/nbd.md)."""
