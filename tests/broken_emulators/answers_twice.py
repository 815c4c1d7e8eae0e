"""Answers every cmd with two dones."""
from _emu import answer, send, serve


def twice(cmd):
    send(answer(cmd))
    send(answer(cmd))


serve(twice)
