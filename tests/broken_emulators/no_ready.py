"""Reads hello and never answers it."""
import time

from _emu import read_frame

read_frame()
time.sleep(3600)
