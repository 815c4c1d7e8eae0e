"""Backing stores for ``sbc.SbcDevice``: a file or block device, and a null store.

Strategy: all I/O is ``os.pread``/``os.pwritev``/``os.preadv``, which release the GIL, so worker threads overlap.
Durability without a second syscall: a FUA write (or any write while WCE is 0) goes through a second descriptor
opened with O_DSYNC. With O_DIRECT, data moves through page-aligned anonymous ``mmap`` buffers from a small pool
(a read's buffer goes back to the pool once its ``done`` is written); I/O that the kernel refuses as unaligned
(EINVAL) is redone on an ordinary descriptor of the same file. OS errors become MEDIUM ERROR sense.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import sys
import threading
from typing import Any

from .sense import Asc, ScsiError, SenseKey
from .spc import Result

BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _read_error(exc: OSError) -> ScsiError:
    print(f"emulator: read failed: {exc}", file=sys.stderr)
    return ScsiError(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)


def _write_error(exc: OSError) -> ScsiError:
    print(f"emulator: write failed: {exc}", file=sys.stderr)
    if exc.errno == errno.ENOSPC:
        return ScsiError(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    return ScsiError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)


class BufferPool:
    """Page-aligned buffers (anonymous mmap) in power-of-two sizes, reused across commands."""

    def __init__(self, keep: int = 16) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}
        self._keep = keep

    def get(self, size: int) -> mmap.mmap:
        cap = max(4096, 1 << (size - 1).bit_length())
        free = self._free.get(cap)
        if free:
            try:
                return free.pop()
            except IndexError:                                 # another thread took the last one
                pass
        return mmap.mmap(-1, cap)

    def put(self, buf: mmap.mmap) -> None:
        free = self._free.setdefault(len(buf), [])
        if len(free) < self._keep:
            free.append(buf)


class FileStore:
    """A regular file (sparse, thin) or a block device.

    Args:
        path: the file or block device.
        size: the LU size in bytes; a regular file is created (``create``) or grown to it sparsely. Default: the
            current size of the file or device.
        read_only, o_direct, thin: see ``emulators.vdisk``. ``thin`` is only possible on regular files.
    """

    def __init__(self, path: str, size: int | None = None, *, create: bool = True, read_only: bool = False,
                 o_direct: bool = False, thin: bool | None = None) -> None:
        self.path = path
        self._flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if not os.path.exists(path):
            if not create or read_only or size is None:
                raise ValueError(f"{path} does not exist (give size and create: true to make it)")
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        self.fd = os.open(path, self._flags)
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if self.is_block:
            current = self._device_size()
        elif stat.S_ISREG(st.st_mode):
            current = st.st_size
            if size is not None and size > current and not read_only:
                os.ftruncate(self.fd, size)                    # sparse: holes until written
                current = size
        else:
            raise ValueError(f"{path} is neither a regular file nor a block device")
        self.size = current if size is None else min(size, current)
        self.thin = (not self.is_block) if thin is None else (bool(thin) and not self.is_block)
        self.lbprz = True                                      # a punched hole reads as zeros
        self.fs_block = st.st_blksize if not self.is_block else 512
        self._sync_fd: int | None = None
        self._lock = threading.Lock()
        self.direct = o_direct
        self.quick = not o_direct
        self._dfd = os.open(path, self._flags | os.O_DIRECT) if o_direct else -1
        self._dsync_dfd: int | None = None
        self._pool = BufferPool()

    def _device_size(self) -> int:
        try:
            return struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
        except OSError:
            return os.lseek(self.fd, 0, os.SEEK_END)

    def _extra_fd(self, flags: int) -> int:
        return os.open(self.path, self._flags | flags)

    def _sync(self) -> int:
        if self._sync_fd is None:
            with self._lock:
                if self._sync_fd is None:
                    self._sync_fd = self._extra_fd(os.O_DSYNC)
        return self._sync_fd

    def _dsync(self) -> int:
        if self._dsync_dfd is None:
            with self._lock:
                if self._dsync_dfd is None:
                    self._dsync_dfd = self._extra_fd(os.O_DSYNC | os.O_DIRECT)
        return self._dsync_dfd

    # -- the hot path -------------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> Any:
        """Data-in for READ: bytes, or a Result whose pooled buffer is released after the answer (O_DIRECT)."""
        if self.direct:
            return self._direct_read(offset, size)
        try:
            out = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise _read_error(exc) from None
        return out if len(out) == size else out.ljust(size, b"\0")

    def pread(self, offset: int, size: int) -> bytes:
        """The bytes at ``offset``, for commands that look at them (VERIFY, COMPARE AND WRITE)."""
        try:
            out = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise _read_error(exc) from None
        return out if len(out) == size else out.ljust(size, b"\0")

    def write(self, offset: int, data: Any, sync: Any) -> None:
        if self.direct:
            self._direct_write(offset, data, sync)
        else:
            self._buffered_write(offset, data, sync)

    def _buffered_write(self, offset: int, data: Any, sync: Any) -> None:
        fd = self._sync() if sync else self.fd
        try:
            done = os.pwrite(fd, data, offset)
            while done < len(data):
                done += os.pwrite(fd, memoryview(data)[done:], offset + done)
        except OSError as exc:
            raise _write_error(exc) from None

    def _direct_read(self, offset: int, size: int) -> Any:
        buf = self._pool.get(size)
        view = memoryview(buf)[:size]
        try:
            got = os.preadv(self._dfd, [view], offset)
        except OSError as exc:
            view.release()
            self._pool.put(buf)
            if exc.errno != errno.EINVAL:
                raise _read_error(exc) from None
            return self.pread(offset, size)                    # unaligned: through the page cache
        if got < size:
            view[got:] = bytes(size - got)

        def release() -> None:
            view.release()
            self._pool.put(buf)
        return Result(0, None, view, release)

    def _direct_write(self, offset: int, data: Any, sync: Any) -> None:
        size = len(data)
        buf = self._pool.get(size)
        view = memoryview(buf)[:size]
        try:
            view[:] = data
            fd = self._dsync() if sync else self._dfd
            done = os.pwritev(fd, [view], offset)
            if done < size:
                raise OSError(errno.EIO, f"short direct write ({done} of {size})")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise _write_error(exc) from None
            self._buffered_write(offset, data, sync)           # unaligned: through the page cache
        finally:
            view.release()
            self._pool.put(buf)

    # -- the rest -----------------------------------------------------------------------------------------------
    def write_same(self, offset: int, size: int, block: bytes, sync: bool) -> None:
        """Write ``block`` repeatedly over ``size`` bytes, a megabyte at a time."""
        chunk = block * max(1, _CHUNK // len(block))
        end = offset + size
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, memoryview(chunk)[:n], False)
            offset += n
        if sync:
            self.flush()

    def punch(self, offset: int, size: int) -> None:
        """Deallocate: the range reads as zeros afterwards."""
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise _write_error(OSError(err, os.strerror(err)))
            self.write_same(offset, size, bytes(4096), False)  # no holes here: zeros do the same for reads

    def extent(self, offset: int) -> tuple[bool, int]:
        """(mapped, end offset) of the run of mapped data or of hole that contains ``offset``."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:                      # only a hole up to the end of the file
                return False, self.size
            return True, self.size
        if data > offset:
            return False, data
        return True, os.lseek(self.fd, offset, os.SEEK_HOLE)

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise _write_error(exc) from None

    def prefetch(self, offset: int, size: int) -> None:
        if size and not self.direct:
            os.posix_fadvise(self.fd, offset, size, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Make what was written durable and close every descriptor."""
        try:
            if self._flags & os.O_RDWR:
                os.fdatasync(self.fd)
        finally:
            for fd in (self.fd, self._sync_fd, self._dfd, self._dsync_dfd):
                if fd is not None and fd >= 0:
                    os.close(fd)
            self.fd = -1


class NullStore:
    """No storage: reads are zeros sliced from one preallocated buffer, writes are discarded."""

    thin = False
    lbprz = False
    quick = True
    discards = True                                             # nothing to overwrite or erase

    def __init__(self, size: int, max_transfer: int) -> None:
        self.size = size
        self._zeros = memoryview(bytes(max_transfer))           # calloc'd: untouched pages cost nothing

    def read(self, offset: int, size: int) -> Any:
        return self._zeros[:size]

    def pread(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: Any, sync: Any) -> None:
        pass

    def write_same(self, offset: int, size: int, block: bytes, sync: bool) -> None:
        pass

    def punch(self, offset: int, size: int) -> None:
        pass

    def extent(self, offset: int) -> tuple[bool, int]:
        return True, self.size

    def flush(self) -> None:
        pass

    def prefetch(self, offset: int, size: int) -> None:
        pass

    def close(self) -> None:
        pass
