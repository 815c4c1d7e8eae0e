"""Writes the first few bytes of its first done, then dies (exit code 3)."""
import os

from _emu import answer, frame, serve, write


def crash(cmd):
    write(frame(answer(cmd))[:9])
    os._exit(3)


serve(crash)
