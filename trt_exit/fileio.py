"""Atomic file writes, hashing, reading users' array files, and checking outputs before work.

Nothing trt_exit writes is ever left half-written: every file goes to a temporary name in the
same directory, is flushed to disk, and is renamed over the target in one step (``os.replace`` is
atomic on POSIX and Windows within one file system).

A writer killed with SIGKILL leaves its temporary file (``.<name>.<random>.tmp``) or staging
folder (``.export-*``, ``.precision-*``) behind. Each holds an exclusive ``flock`` while its
writer lives, so :func:`remove_stale_temporaries` can tell a dead writer's leftovers (the lock
is free: the kernel released it with the process) from a running writer's (see docs/trust.md).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from trt_exit.errors import InputError, OutputError

try:  # POSIX; elsewhere temporaries are not locked and never removed as stale
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _file_mode() -> int:
    # mkstemp creates files 0600; give them the mode a plain open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()

#: Prefixes of the staging folders export and precision passes write into before moving files.
STAGING_PREFIXES = (".export-", ".precision-")
#: A staging folder without its owner lock file is stale once it is this old (it is created
#: and locked in the same call; only a kill in between leaves one without the lock file).
_UNLOCKED_STAGING_STALE_S = 60.0
_OWNER_NAME = ".owner"
#: Lock file descriptors of the staging folders this process owns.
_staging_locks: dict[str, int] = {}


def _try_lock(fd: int) -> bool:
    """Takes an exclusive flock on ``fd`` without waiting; False when another process has it."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _cannot_write(target: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {target} ({reason}); check the folder exists, is writable "
                       f"and has free space")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``target``; renames it over ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left as it was. The
    target's folder is created if missing (the writers that use this directly write into the
    model directory's own layout; outputs users name are checked first with
    :func:`check_output_file`, which does not create folders). Use it for writers that want a
    path (``torch.onnx.export``, ``onnx.save``).

    Raises:
        OutputError: The folder cannot be created or written, or the rename fails.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(target)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _cannot_write(target, exc) from exc
    tmp = Path(tmp_name)
    try:
        _try_lock(fd)  # held until the rename: marks the temporary as a live writer's
        yield tmp
        try:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, target)
        except OSError as exc:
            raise _cannot_write(target, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``target`` atomically and returns the path."""
    with atomic_path(target) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            raise _cannot_write(Path(target), exc) from exc
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 ``text`` to ``target`` atomically and returns the path."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def _nonfinite_at(obj: Any, where: str = "") -> str | None:
    """JSON path of the first NaN / Infinity in ``obj``, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    if isinstance(obj, dict):
        items: Iterable = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for path, value in items:
        found = _nonfinite_at(value, path)
        if found:
            return found
    return None


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON: NaN and Infinity (which JSON does not have) are refused.

    Raises:
        OutputError: ``obj`` holds NaN or Infinity; the message names the field.
    """
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as exc:
        where = _nonfinite_at(obj)
        if where is None:
            raise
        raise OutputError(f"refusing to write a non-finite number (NaN or Infinity) at {where}: "
                          f"JSON cannot hold it and it means a computation went wrong") from exc


def atomic_write_json(target: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented, strict JSON (no NaN / Infinity) to ``target`` atomically."""
    return atomic_write_text(target, json_text(obj) + "\n")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- users' files

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def check_input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """``path`` if it is a readable regular file; else an :class:`InputError` that says what it
    is instead (missing, a folder, a device)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a folder; name a file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is not a regular file (a device, pipe or socket); "
                         f"name a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permission denied)")
    return path


def _pickled(what: str, path: Path) -> InputError:
    return InputError(f"{what} {path} is not a .npy or .npz array file of numbers: it holds "
                      f"Python objects (pickled data), which trt-exit never loads")


class NpyRows:
    """The rows of a ``.npy`` file, read from disk a slice at a time (``rows[a:b]`` is an
    array): memory stays flat however large the file (a memory map would keep every page it
    touched resident).

    Attributes:
        shape: The array's shape.
        dtype: Its dtype.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, offset: int):
        self.path, self.shape, self.dtype, self._offset = path, shape, dtype, offset
        self.ndim = len(shape)
        self._row_items = int(math.prod(shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice):
        import numpy as np

        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NpyRows supports contiguous slices only")
        start, stop, _ = rows.indices(len(self))
        count = max(0, stop - start)
        values = np.fromfile(self.path, dtype=self.dtype, count=count * self._row_items,
                             offset=self._offset + start * self._row_items * self.dtype.itemsize)
        if values.size != count * self._row_items:
            raise InputError(f"{self.path} is truncated: it ends before row {stop}")
        return values.reshape((count, *self.shape[1:]))


def _npy_rows(path: Path) -> NpyRows | None:
    """A lazy reader of ``path`` (a .npy of numbers in C order), or None to read it whole."""
    import numpy as np

    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return None
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if fortran_order or dtype.hasobject or len(shape) < 1:
        return None
    expected = offset + int(math.prod(shape)) * dtype.itemsize
    if path.stat().st_size < expected:
        raise InputError(f"{path} is a damaged or truncated array file (it holds "
                         f"{path.stat().st_size} bytes, its header promises {expected})")
    return NpyRows(path, tuple(shape), dtype, offset)


def load_arrays(path: str | os.PathLike, what: str = "array file", lazy: bool = False) -> Any:
    """A user's array file: ``.npz`` -> ``{name: array}`` (read in full, file closed), ``.npy`` ->
    one array. Never unpickles.

    Args:
        lazy: ``.npy`` only: return :class:`NpyRows`, which reads rows from disk as they are
            sliced (for inputs larger than memory, run in chunks).

    Raises:
        InputError: ``path`` is missing, not a regular file, or not an array file (the message
            starts with ``what``).
    """
    import numpy as np

    path = check_input_file(path, what)
    with open(path, "rb") as handle:
        head = handle.read(len(_NPY_MAGIC))
    if not (head.startswith(_NPY_MAGIC) or head.startswith(_ZIP_MAGIC)):
        shown = "it is empty" if not head else f"it starts with {head!r}"
        raise InputError(f"{what} {path} is not a .npy or .npz array file ({shown}); save arrays "
                         f"with numpy.save / numpy.savez")
    try:
        if lazy and head.startswith(_NPY_MAGIC):
            rows = _npy_rows(path)
            if rows is not None:
                return rows
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise _pickled(what, path) from exc
        raise InputError(f"{what} {path} is a damaged or truncated array file ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{what} {path} is damaged or truncated ({exc})") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        try:
            with loaded:
                return {name: loaded[name] for name in loaded.files}
        except ValueError as exc:
            raise _pickled(what, path) from exc
        except Exception as exc:  # zipfile.BadZipFile, zlib.error, EOFError: damaged archive
            raise InputError(f"{what} {path} is a damaged .npz archive ({exc})") from exc
    return loaded


# --------------------------------------------------------------------------- outputs


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (after symlinks; hard links too when both exist)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a symlink loop names no file
        return False


def check_output_dir(folder: str | os.PathLike, what: str, create: bool = False) -> Path:
    """Checks that ``folder`` exists (or creates it when ``create``) and can be written.

    Raises:
        OutputError: It is missing (and not to be created), not a folder, or not writable.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        if not create:
            raise OutputError(f"{what}: folder {folder} does not exist; create it first "
                              f"(trt-exit does not create folders it was not asked to)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{what}: cannot create folder {folder} ({exc.strerror})") from exc
    if not folder.is_dir():
        raise OutputError(f"{what}: {folder} is not a folder")
    reason = None
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(folder) else "permission denied"
    else:  # access() trusts root and permission bits; creating a file is the real test
        try:
            fd, probe = tempfile.mkstemp(prefix=".trt-exit-probe.", suffix=".tmp", dir=folder)
        except OSError as exc:
            reason = exc.strerror or str(exc)
        else:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):  # a concurrent clean-up may be first
                os.unlink(probe)
    if reason:
        raise OutputError(f"{what}: cannot write in {folder} ({reason}); choose a writable "
                          f"location")
    return folder


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_file(path: str | os.PathLike, what: str, models: Iterable[Any] = (),
                      inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                      create_folder: bool = False) -> Path:
    """Checks, before any work, that a command may write its output file ``path``.

    Every command calls this for every file it will write that the user named, so nothing is
    computed only to fail at the end, and no output destroys data.

    Args:
        path: The output file.
        what: How the user named it (``"--output"``), for the message.
        models: Model directories the command reads: objects with ``owned_file(path) -> str |
            None`` (:class:`trt_exit.manifest.Manifest`), saying why a path is the model's.
        inputs: ``(option, path)`` of every input file of the command.
        create_folder: Create the file's folder if missing (only where the command documents
            it); otherwise a missing folder is an error.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: ``path`` is a folder or a device, a file of a model directory, one of the
            command's inputs, or its folder is missing or not writable.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; name a file")
    if path.exists() and not path.is_file():
        raise OutputError(f"{what} {path} is not a regular file (a device, pipe or socket); "
                          f"name a file")
    for model in models:
        reason = model.owned_file(path)
        if reason:
            raise OutputError(f"{what} {path} would overwrite {reason}; write it outside the "
                              f"model's files")
    for option, source in inputs:
        if source is not None and same_file(path, source):
            raise OutputError(f"{what} {path} is this command's input ({option}); writing it "
                              f"would destroy the input: choose another name")
    check_output_dir(path.parent, what, create=create_folder)
    return path


# --------------------------------------------------------------------------- leftovers


def make_staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new staging folder in ``parent``, locked by this process until
    :func:`remove_staging_dir` (or the process's death, which makes it stale)."""
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(path / _OWNER_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise _cannot_write(Path(parent) / f"{prefix}*", exc) from exc
    _try_lock(fd)
    _staging_locks[str(path)] = fd
    return path


def remove_staging_dir(path: str | os.PathLike) -> None:
    """Removes a staging folder made by :func:`make_staging_dir` and releases its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _staging_locks.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def _owner_gone(path: Path) -> bool:
    """Whether nobody holds the flock on ``path`` (the owner lock or a temporary file)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)  # releases the probe's lock


#: Names :func:`atomic_path` gives its temporaries (mkstemp adds 8 random characters).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _is_temporary(name: str) -> bool:
    return _TEMPORARY.match(name) is not None


def _remove_stale_siblings(target: Path) -> None:
    """Removes temporaries of ``target`` left by killed writers (their lock is free)."""
    if fcntl is None:  # pragma: no cover
        return
    for path in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if _is_temporary(path.name) and _owner_gone(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def remove_stale_temporaries(root: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Removes what killed writers left under ``root``: temporary files of :func:`atomic_path`
    and staging folders of :func:`make_staging_dir` whose owner no longer holds their lock.

    Call it with the manifest lock held. Live writers' files are kept (their owner holds the
    lock); where ``flock`` is unavailable nothing is removed.

    Returns:
        What was removed.
    """
    if fcntl is None:  # pragma: no cover
        return []
    removed: list[Path] = []
    root = Path(root)
    for folder, dirnames, filenames in os.walk(root):
        folder_path = Path(folder)
        level = len(folder_path.relative_to(root).parts)
        for name in list(dirnames):
            if not name.startswith(STAGING_PREFIXES):
                continue
            dirnames.remove(name)  # never descend into a staging folder
            staging = folder_path / name
            owner = staging / _OWNER_NAME
            stale = False
            if owner.exists():
                stale = _owner_gone(owner)
            else:
                with contextlib.suppress(OSError):
                    stale = time.time() - staging.stat().st_mtime > _UNLOCKED_STAGING_STALE_S
            if stale:
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
        if level + 1 >= depth:
            dirnames.clear()
        for name in filenames:
            if _is_temporary(name) and _owner_gone(folder_path / name):
                with contextlib.suppress(FileNotFoundError):
                    (folder_path / name).unlink()
                    removed.append(folder_path / name)
    return removed
