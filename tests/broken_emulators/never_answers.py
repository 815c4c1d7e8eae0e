"""Says ready, then reads everything and answers nothing: no done, no pong (a hung emulator)."""
from _emu import read_frame, ready, send

send(ready(read_frame()))
while read_frame() is not None:
    pass
