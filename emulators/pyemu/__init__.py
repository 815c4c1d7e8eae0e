"""pyemu: the library Python emulators are built from. It never imports trioscsi: the protocol is the contract.

General layout: ``wire`` (frames), ``runner`` (handshake, dispatch, ping, abort, shutdown), ``sense`` (errors
that carry their sense data), ``spc`` (commands every device type shares), ``sbc`` (the disk command set),
``stores`` (backing stores for sbc), ``client`` and ``bench`` (a synchronous peer for tests and measurements).
"""
