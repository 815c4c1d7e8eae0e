"""Prints a log line on stdout before its ready (logs belong on stderr)."""
from _emu import ready, send, serve, write

serve(on_hello=lambda hello: (write(b"starting emulator...\n"), send(ready(hello))))
