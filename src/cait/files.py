"""Reading and writing files safely: the atomic writers of a file and of a folder, loading
without unpickling, and one writer per folder or output.

Every file cait writes (run checkpoints, weights, converted checkpoints, exports) goes
through :func:`atomic_write`, every folder written whole (a timm export) through
:func:`write_folder_atomically`, and every torch file it reads goes through
:func:`load_file_safely`. A folder that one process fills over time (a run) is held with
:class:`FolderLock`; an output written whole (an export) with :class:`OutputLock`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

__all__ = [
    "FolderLock",
    "FolderLockedError",
    "OutputLock",
    "atomic_write",
    "error_line",
    "first_line",
    "load_file_safely",
    "remove_stale_temporaries",
    "signals_deferred",
    "temporary_path",
    "write_folder_atomically",
]

logger = logging.getLogger(__name__)

# Files cait writes are readable by everyone, like any file a user writes.
FILE_MODE = 0o644
# torch.save writes a zip archive; the legacy format (torch < 1.6) is a pickle stream, which
# opens with the PROTO opcode 0x80 (pickle protocol 2 and later).
_ZIP_START = b"PK\x03\x04"
_PICKLE_START = b"\x80"
# A temporary file is named after its target, the host and the writing process:
# ".NAME.HOST-PID.tmp" (HOST without dots), so that a folder shared by several machines
# tells whose writer is gone.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.tmp$")
# Linux process ids are below 2**22 (kernel.pid_max's ceiling).
_PID_MAX = 1 << 22
# Signals that end a process and that a write in progress waits for (Ctrl-C, a scheduler's
# SIGTERM); SIGKILL cannot be waited for, which the temporary file's name is for.
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`atomic_write` writes ``path`` first: beside it, named per process, so
    two processes writing the same file never share one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.tmp")


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_") or "host"


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends: a Ctrl-C or a scheduler's SIGTERM
    arriving mid-write takes effect once the file is complete (renamed into place or
    removed), never halfway; a second one meanwhile changes nothing.

    The signals are caught by a handler that notes them and raised again, once each, when
    the block ends, so whatever handled them before (Python's KeyboardInterrupt, a
    training loop's handler, the default) then does. Blocking them in the thread's signal
    mask would not do: the kernel hands a process's signal to any thread that does not
    block it (torch's worker threads). Only the main thread may set handlers, so
    elsewhere this does nothing.
    """
    with _deferred_signals():
        yield


@contextlib.contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """:func:`signals_deferred`, yielding the signals noted so far: one the caller removes
    from the list is not raised again."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: object) -> None:
        if signum not in received:
            received.append(signum)

    previous = {}
    for sig in _DEFERRED_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not None:  # None: set outside Python, which cannot be restored
            previous[sig] = signal.signal(sig, note)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in received:
            signal.raise_signal(sig)


@contextlib.contextmanager
def _rename_window(path: Path) -> Iterator[None]:
    """Around the rename that ends an interruptible write: SIGINT and SIGTERM wait for it.
    A Ctrl-C that came meanwhile is too late to stop the write, now complete: it is
    dropped, saying so (a SIGTERM still ends the process, after the rename)."""
    with _deferred_signals() as received:
        yield
        if signal.SIGINT in received:
            received.remove(signal.SIGINT)
            logger.warning("Ctrl-C came as %s was put in place: it is complete", path)


def _signal_windows(
    interruptible: bool, path: Path
) -> tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]:
    """What holds SIGINT and SIGTERM around a write and around its rename: the whole write
    waits for them, or (``interruptible``) only the rename does."""
    if interruptible:
        return contextlib.nullcontext(), _rename_window(path)
    return signals_deferred(), contextlib.nullcontext()


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], None], *, interruptible: bool = False
) -> Path:
    """Write a file through ``write(temporary_path)``, then rename it over ``path``.

    The temporary file (:func:`temporary_path`) sits beside ``path`` (same file system, so
    the rename is atomic) and is flushed to disk before the rename: a write that fails, a
    process killed or a disk filling up mid-write leave the previous ``path`` intact. A
    failed write removes its temporary file (a full disk, an error, Ctrl-C: SIGINT and
    SIGTERM wait for the write to end); a process killed with SIGKILL cannot, and
    :func:`remove_stale_temporaries` removes what it left. Parent folders are created.

    With ``interruptible`` (a long write that is worth nothing half done, an export),
    Ctrl-C stops the write itself, which then leaves nothing; only the rename waits.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    around_write, around_rename = _signal_windows(interruptible, path)
    with around_write:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            with around_rename:
                os.replace(tmp, path)
                _fsync_folder(path.parent)  # the rename itself survives a power cut
        except BaseException as err:
            # torch.save reports a full disk as a RuntimeError from its C++ writer; say it
            full = isinstance(err, RuntimeError) and _disk_full(tmp.parent)
            tmp.unlink(missing_ok=True)
            if full:
                raise OSError(errno.ENOSPC, f"No space left on device writing {path}") from err
            raise
    return path


def write_folder_atomically(
    output: str | os.PathLike[str], write: Callable[[Path], None], *, interruptible: bool = False
) -> Path:
    """Fill a temporary folder beside ``output`` through ``write(folder)``, then swap it in
    for ``output`` (what was there is moved aside, and removed once the new folder is in
    place): a failure leaves ``output`` as it was and no temporary folder behind. Whether
    ``output`` may be replaced is the caller's to decide. Signals wait as for
    :func:`atomic_write`, the swap always. A folder of a process killed mid-way is removed
    by :func:`remove_stale_temporaries`. Parent folders are created."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(output)  # per process: two writers never share one
    old = temporary_path(output.with_name(f"{output.name}.old"))
    around_write, around_rename = _signal_windows(interruptible, output)
    with around_write:
        try:
            tmp.mkdir()
            write(tmp)
            with around_rename:
                if os.path.lexists(output):
                    output.rename(old)
                tmp.rename(output)
                _remove(old)
        except BaseException:
            _remove(tmp)
            if old.exists() and not output.exists():
                old.rename(output)
            raise
    return output


def _remove(path: Path) -> None:
    """Remove a folder with what it holds, or a file or link; nothing when there is none."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading (some platforms)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # file systems that do not sync folders
    finally:
        os.close(fd)


# Below this much free space a writer's failure is taken for a full disk.
_FULL_DISK_BYTES = 1 << 20


def _disk_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _FULL_DISK_BYTES


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one we may not signal runs too); an
    impossible id (from a crafted name) is no process."""
    if not 0 < pid < _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` whose writer is no
    longer running (killed mid-write); returns them. Call it holding the folder's
    :class:`FolderLock`, so that no other cait process writes there; with ``name``, only
    the temporaries of that target are removed. Folders named so (filled, then renamed
    into place) are removed too. Only this host's writers can be checked, so only their
    temporaries are removed."""
    removed = []
    for entry in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != _host() or _process_alive(int(match["pid"])):
            continue  # another machine's (it cannot be checked from here), or alive
        if name is not None and match["name"] not in (name, f"{name}.old"):
            continue
        _remove(entry)  # a file, or a folder being filled (an export)
        removed.append(entry)
    return removed


class FolderLockedError(ValueError):
    """Another process holds the lock of a folder (or of an output: :class:`OutputLock`)."""


class FolderLock:
    """One writer per folder: the file ``.lock`` in it names the holder (process id, host,
    start time) and is created exclusively, so a second process is refused with that name.

    A lock whose process is gone from this host (killed, the machine restarted) is stale:
    it is taken over with a warning. A lock of another host cannot be checked from here:
    it is refused, saying how to remove it. Use it as a context manager; the lock is removed
    on every exit of the block (a process killed with SIGKILL leaves it, stale).
    """

    NAME = ".lock"
    # what the refusal says there is one writer per
    KIND = "folder"

    def __init__(self, folder: str | os.PathLike[str], what: str = "cait") -> None:
        self.target = Path(folder)  # what the lock guards: the folder (or the output)
        self.path = self.target / self.NAME
        self.what = what
        self._held = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FolderLockedError` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": self.what,
        }
        # the lock appears with its owner written in it: filled under a name of its own,
        # then linked into place (link fails when the lock exists, as O_EXCL would)
        filled = temporary_path(self.path)
        filled.write_text(json.dumps(owner))
        try:
            self._take(filled)
        finally:
            filled.unlink(missing_ok=True)

    def _take(self, filled: Path) -> None:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                os.link(filled, self.path)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._is_stale(holder):
                    logger.warning("%s: removing a stale lock (%s)", self.target, _describe(holder))
                    self.path.unlink(missing_ok=True)
                    continue
                raise FolderLockedError(self._refusal(holder)) from None
            self._held = True
            return
        raise FolderLockedError(f"{self.target}: could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if self._held:
            holder = self._holder()
            if holder is not None and holder["pid"] == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def _holder(self) -> dict[str, Any] | None:
        """The lock's owner as written, or None for a lock that cannot be read (a process
        killed between creating and filling it)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
            return None
        return holder

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        same_host = holder.get("host") == socket.gethostname()
        return same_host and not _process_alive(holder["pid"])

    def _refusal(self, holder: dict[str, Any]) -> str:
        if holder.get("host") != socket.gethostname():
            return (
                f"{self.target} is in use by {_describe(holder)}; if that process has ended, "
                f"remove {self.path}"
            )
        return f"{self.target} is in use by {_describe(holder)}: one writer per {self.KIND}"


class OutputLock(FolderLock):
    """One writer per output written whole (a file or a folder, an export): as
    :class:`FolderLock`, with the lock file beside the output, named ``.NAME.lock``, so
    that it is never part of what is written. Once taken, the output's temporaries left by
    a writer killed mid-way are removed (the holder is the output's only writer)."""

    KIND = "output"

    def __init__(self, output: str | os.PathLike[str], what: str = "cait") -> None:
        super().__init__(output, what)
        self.path = self.target.with_name(f".{self.target.name}.lock")

    def acquire(self) -> None:
        super().acquire()
        for path in remove_stale_temporaries(self.target.parent, self.target.name):
            logger.info("removed %s, left by a process killed while writing it", path)


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unreadable lock file"
    return (
        f"{holder.get('what', 'a process')} (pid {holder['pid']} on {holder.get('host')}, "
        f"since {holder.get('started')})"
    )


def load_file_safely(path: str | os.PathLike[str]) -> Any:
    """A ``.safetensors`` file, or a torch file read with ``weights_only=True``; a file holding
    other objects raises ``ValueError`` instead of being unpickled."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    with open(path, "rb") as f:
        start = f.read(len(_ZIP_START))
    if not start.startswith((_ZIP_START, _PICKLE_START)):
        raise ValueError(f"{path} is not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain "
            f"containers, and loading never unpickles arbitrary code ({first_line(err)})"
        ) from err
    except (EOFError, KeyError, RuntimeError) as err:  # what torch.load raises on other bytes
        raise ValueError(
            f"{path} is not a torch checkpoint: torch cannot read it ({error_line(err)})"
        ) from err


def first_line(err: BaseException) -> str:
    """An error's message cut to its first line (errors reach users on one line; the
    error's type when it has no message)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def error_line(err: BaseException) -> str:
    """The error's type and the first line of its message, for errors a user only sees the
    cause of (``KeyError: 'x'``; the type alone when it has no message)."""
    name, line = type(err).__name__, first_line(err)
    return name if line == name else f"{name}: {line}"
