"""Answers every cmd under the wrong tag (cmd.tag + 1)."""
from _emu import answer, send, serve

serve(lambda cmd: send({**answer(cmd), "tag": cmd["tag"] + 1}))
