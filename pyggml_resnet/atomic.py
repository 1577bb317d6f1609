"""Files written whole or not at all: the one way every command writes what it makes (model files, result
files, downloads).

`replacing(path)` yields a temporary path beside `path` (same directory, so the final rename cannot cross
file systems); when the block ends normally the data is synced to disk, given the mode a new file gets from
the umask (as ``cp`` or ``tar`` give it; ``mkstemp``'s own is 0600) and renamed over `path` in one step.
On every other way out, an exception, Ctrl-C, or SIGTERM as schedulers, containers and Ray stop jobs, the
temporary file is deleted and a file already at `path` is left as it was. `scratch` is the temporary part
alone, for a file that is used and deleted (a download before it is converted).

A failure of the disk itself (full, read-only, over quota) is raised as an OSError that names `path`, not
the hidden temporary name. `check_target` refuses, before any work, a path no file can be written at.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

# Errors that say the target's file system cannot take the file: reported under the target's name.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


class Terminated(SystemExit):
    """SIGTERM arrived while a file was being written. A SystemExit, so that unless someone catches it the
    process ends with the status SIGTERM's default action reports to a shell (143), after the cleanup."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turns SIGTERM into `Terminated` inside the block, so that cleanup runs; the old handler is restored
    after. Only where SIGTERM would otherwise kill the process outright (its default action) and Python can
    set a handler (the main thread): a program with a handler of its own keeps it."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_target(path: str | os.PathLike, what: str = "output") -> Path:
    """`path`, if a file can be made there: not a directory, in a directory that exists. Called before any
    work, so that a run does not compute everything and then fail to write it. Raises InputError."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory")
    if not path.parent.is_dir():
        raise InputError(f"{what} {path}: its directory {path.parent} does not exist")
    return path


def new_file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask."""
    umask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def scratch(directory: str | os.PathLike, name: str, *, target: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yields the path of a new empty temporary file in `directory`, hidden and named after `name`; it is
    deleted on every way out of the block, SIGTERM included. A storage error (full disk, read-only
    directory) is raised naming `target` (default: directory/name) rather than the temporary name."""
    target = Path(target if target is not None else Path(directory) / name)
    prefix = f".{name}."
    with _sigterm_raises(), _named(target, prefix):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".part")
        try:
            os.close(fd)  # writers open the file by name (the GGUF writer does)
            yield Path(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`, to be written by the block; when the block succeeds it becomes
    `path` atomically (see the module docstring). Raises OSError naming `path` if the disk refuses it."""
    path = Path(path)
    with scratch(path.parent, path.name, target=path) as tmp:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename, or a crash could leave it empty
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    if os.name == "posix":  # make the rename itself durable (directories cannot be opened on Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _named(target: Path, prefix: str) -> Iterator[None]:
    """Re-raises a storage error about a temporary file of `target` (its name starts with `prefix`), or about
    no file (a failed write), as one about `target`. Errors about other files, and the package's own errors,
    pass unchanged."""
    try:
        yield
    except OSError as e:
        if type(e) not in (OSError, PermissionError):  # the package's own errors, a missing input, ...
            raise
        if e.errno is None and e.filename is None:  # NumPy's tofile says only "N requested and M written"
            raise OSError(f"{target}: a write was cut short ({e}): is the disk full? Nothing written; any "
                          "previous file is kept") from e
        about_ours = e.filename is None or os.path.basename(e.filename).startswith(prefix)
        if e.errno not in _STORAGE_ERRNOS or not about_ours:
            raise
        raise OSError(e.errno, f"{e.strerror} (nothing written; any previous file is kept)", str(target)) from e
