"""Answers unknown opcodes with CHECK CONDITION but sense data that is not fixed or descriptor format."""
from _emu import answer, send, serve

serve(lambda cmd: send({**answer(cmd), "sense": b"\x05\x20\x00"} if cmd["cdb"][0] else answer(cmd)))
