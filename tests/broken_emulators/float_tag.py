"""Echoes tags as CBOR floats, as a JavaScript encoder does for numbers >= 2^32 (tags must be uints)."""
from _emu import answer, send, serve

serve(lambda cmd: send({**answer(cmd), "tag": float(cmd["tag"])}))
