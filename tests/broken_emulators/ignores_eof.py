"""Keeps running after its stdin is closed (it should exit 0)."""
import time

from _emu import read_frame, ready, send, answer

send(ready(read_frame()))
while (message := read_frame()) is not None:
    if message["op"] == "ping":
        send({"op": "pong", "tag": message["tag"]})
    elif message["op"] == "cmd":
        send(answer(message))
time.sleep(3600)
