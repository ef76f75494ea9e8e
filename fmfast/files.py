"""Writing outputs so that a crash, a kill or a full disk never leaves a half-written file, a
destroyed earlier result or a traceback behind: temporary file + rename (``atomic_write``),
temporaries of dead processes swept on the next start (``sweep_temporaries``), the output
location checked before any long work (``check_output``), one run per folder (``FolderLock``),
and OS write errors (full, read-only, ...) reworded as one ``OutputError`` line naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from fmfast.errors import OutputError

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a path component is not a folder",
            errno.EISDIR: "is a folder", errno.EEXIST: "already exists", errno.EFBIG: "file too large",
            errno.EIO: "input/output error"}


def output_error(path, e: OSError, what: str = "write") -> OutputError:
    """An OSError met while writing ``path`` -> one line naming the path and the reason."""
    reason = _REASONS.get(e.errno, e.strerror or str(e))
    return OutputError(f"{path}: cannot {what} ({reason})")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary's name carries this process's id (``.NAME.PID.XXXX.tmp``), so that
    ``sweep_temporaries`` can remove those of killed processes. An OSError on the way (full or
    read-only disk) becomes an OutputError naming ``path``; the temporary is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise OutputError(f"{path}: exists and is not a regular file; refusing to replace it")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise output_error(path, e) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(path, e) from None
        raise


@contextlib.contextmanager
def atomic_files(entry: str | os.PathLike, *others: str | os.PathLike):
    """Several files that belong together (a model and its weights, a state_dict and its
    sidecar), written as one: yields a temporary folder next to ``entry`` in which the caller
    writes each file under its own name. On success the old ``entry`` (the file a reader opens)
    is removed first, the others are renamed into place, ``entry`` last: at no moment does an
    ``entry`` stand next to the other half of another pair. On failure nothing is touched."""
    entry = Path(entry)
    paths = [Path(p) for p in others] + [entry]
    if any(p.parent != entry.parent for p in paths):
        raise ValueError("atomic_files: the files must share a folder")
    for p in paths:
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise OutputError(f"{p}: exists and is not a regular file; refusing to replace it")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.{os.getpid()}.", suffix=".tmp", dir=entry.parent))
    except OSError as e:
        raise output_error(entry, e) from None
    try:
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
        for p in paths:
            os.replace(tmp / p.name, p)
    except BaseException as e:
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(entry, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``atomic_write`` temporaries in ``folder`` whose process is gone (a kill
    left them); -> the removed paths."""
    gone = []
    folder = Path(folder)
    if not folder.is_dir():
        return gone
    for p in folder.glob(".*.tmp"):
        parts = p.name.rsplit(".", 3)  # ['.NAME', 'PID', 'XXXX', 'tmp']
        if len(parts) == 4 and parts[1].isdigit() and not pid_alive(int(parts[1])):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() else p.unlink()  # (atomic_files writes a folder)
                gone.append(p)
    return gone


def check_output(path: str | os.PathLike, kind: str = "folder", create: bool = False) -> Path:
    """Before any long work: ``path`` (a ``"folder"`` to create or fill, or a ``"file"`` to
    create or replace) must not be an existing thing of another kind -- a file, a symlink, a
    FIFO, a device -- and the folder it goes in (or, not created yet unless ``create``, its
    nearest existing parent) must be writable: a probe file is created there and removed.
    -> the folder that will be written to."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; refusing to write through it (give its target)")
    if path.exists():
        mode = path.stat().st_mode
        if kind == "folder" and not stat.S_ISDIR(mode):
            raise OutputError(f"{path}: exists and is not a folder")
        if kind == "file" and not stat.S_ISREG(mode):
            what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, a device or a socket)"
            raise OutputError(f"{path}: exists and is {what}; refusing to replace it")
    folder = path if kind == "folder" else path.parent
    probe_in = folder
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(folder, e) from None
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputError(f"{probe_in}: is not a folder, so {path} cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".probe.{os.getpid()}.", suffix=".tmp", dir=probe_in)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise output_error(probe_in if probe_in == folder else path, e) from None
    return folder


class FolderLock:
    """``folder/.lock`` holding this process's id while a run writes to the folder; a second
    run into the same folder is refused while the first one lives. A lock left by a killed
    process (its pid is gone) is taken over."""

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.path = Path(folder) / ".lock"
        self.what = what
        self._held = False

    def holder(self) -> int | None:
        """The live process other than this one that holds the lock, or None."""
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and pid != os.getpid() and pid_alive(pid) else None

    def check(self) -> None:
        """Refuse now, without taking the lock, if a live run holds it."""
        pid = self.holder()
        if pid:
            raise OutputError(f"{self.path.parent}: another {self.what} (process {pid}) is writing "
                              f"to this folder; wait for it or choose another folder")

    def acquire(self) -> FolderLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise OutputError(f"{self.path.parent}: another {self.what} (process {pid}) is writing "
                                      f"to this folder; wait for it or choose another folder") from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale: its process is gone
                continue
            except OSError as e:
                raise output_error(self.path, e) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self._held = True
            return self
        raise OutputError(f"{self.path}: cannot take the folder lock")

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
