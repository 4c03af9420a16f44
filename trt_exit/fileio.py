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
import tokenize
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


# --------------------------------------------------------------------------- path errors

#: The longest file name (one path component), in bytes, that Linux file systems take
#: (``NAME_MAX``: ext4, XFS, Btrfs, tmpfs, NFS).
NAME_MAX_BYTES = 255
#: The longest path the kernel takes, in bytes (``PATH_MAX`` less its terminating NUL).
PATH_MAX_BYTES = 4095
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shown_path(path: str | os.PathLike, limit: int = 100) -> str:
    """``path`` for a one-line message: control characters escaped (a newline in a file name
    must not break the line), the middle of a very long path left out."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], os.fspath(path) if not isinstance(
        path, bytes) else os.fsdecode(path))
    if len(text) > limit:
        text = f"{text[: limit - 30]}...{text[-25:]} ({len(text)} characters)"
    return text


def path_text_problem(text: str | os.PathLike) -> str | None:
    """Why ``text`` cannot name a file on this system (a NUL byte, a name over
    :data:`NAME_MAX_BYTES`, a path over :data:`PATH_MAX_BYTES`, characters the file system
    encoding cannot hold), or None; these are what the OS would refuse with a ``ValueError``
    or ``ENAMETOOLONG``."""
    text = os.fspath(text)
    if isinstance(text, bytes):
        raw = text
    else:
        if "\0" in text:
            return "it contains a NUL byte, which no file name may hold"
        try:
            raw = os.fsencode(text)
        except UnicodeEncodeError:
            return "it holds characters this system's file names cannot (not valid UTF-8)"
    if b"\0" in raw:
        return "it contains a NUL byte, which no file name may hold"
    if len(raw) > PATH_MAX_BYTES:
        return (f"it is {len(raw)} bytes long, more than the {PATH_MAX_BYTES} a path may "
                f"have; use a shorter path")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX_BYTES:
            return (f"a name in it is {len(part)} bytes long, more than the {NAME_MAX_BYTES} "
                    f"a file name may have; use a shorter name")
    return None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """A library error's text for a one-line message: its first line, shortened."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def path_problem(exc: BaseException) -> str:
    """A short, one-line description of the OS error ``exc`` raised for a path (for messages
    that name the path themselves)."""
    if isinstance(exc, ValueError):
        if "null" in str(exc):
            return "the path contains a NUL byte, which no file name may hold"
        return _first_line(exc)
    if isinstance(exc, UnicodeError):
        return "the path holds characters this system's file names cannot"
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return (f"a name in the path is longer than {NAME_MAX_BYTES} bytes, or the path longer "
                f"than {PATH_MAX_BYTES}")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "the path runs through a symlink loop"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return _first_line(exc)


#: What to do about an OS error on a path, by errno (the rest: check the path).
_PATH_ADVICE = {
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder: name a file",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.ELOOP: "replace the symlink loop with a file or folder",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error_message(exc: BaseException) -> str | None:
    """The one-line error for an OS error on a path that a command did not turn into its own
    message (the CLI's last resort: it names the path and says what to do), or None when
    ``exc`` is not one: an ``OSError`` that names a file, a ``ValueError`` for a NUL byte in a
    path, a ``UnicodeEncodeError`` for a file name the system cannot encode."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        advice = _PATH_ADVICE.get(exc.errno, "check the path")
        return f"cannot use {shown_path(exc.filename)}: {path_problem(exc)}; {advice}"
    if isinstance(exc, ValueError) and str(exc) in ("embedded null byte",
                                                    "embedded null character"):
        return "a path contains a NUL byte, which no file name may hold; check the paths given"
    if isinstance(exc, UnicodeEncodeError) and exc.reason == "surrogates not allowed":
        return ("a file name is not valid UTF-8 and cannot be passed on; rename the file (or "
                "folder) to a UTF-8 name")
    return None


# --------------------------------------------------------------------------- users' files

_NPY_MAGIC = b"\x93NUMPY"
#: A zip archive starts with a file entry, or (empty) with its end record.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
#: Longest .npy header read (numpy's own default ``max_header_size``); numpy's writer pads its
#: headers to a few hundred bytes at most, so a longer one is a damaged or crafted file.
NPY_MAX_HEADER = 10000
#: Element kinds a model input may have: bool, signed and unsigned integers, floating point.
_NUMBER_KINDS = "biuf"


def check_input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """``path`` if it is a readable regular file; else an :class:`InputError` that says what it
    is instead (missing, a folder, a device)."""
    path = Path(path)
    problem = path_text_problem(path)
    if problem:
        raise InputError(f"{what} {shown_path(path)}: {problem}")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {path} cannot be read ({path_problem(exc)})") from None
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


def _damaged(what: str, path: Path, problem: str) -> InputError:
    return InputError(f"{what} {path} is a damaged or truncated array file ({problem}); save "
                      f"the arrays again with numpy.save / numpy.savez")


def _npy_header(handle, what: str, path: Path) -> tuple[tuple[int, ...], bool, Any]:
    """``(shape, fortran_order, dtype)`` from the .npy header at ``handle``'s position (left
    after the header), after checking everything a reader relies on: a known format version, a
    header numpy reads safely, a shape of non-negative sizes, an element type of numbers.

    Raises:
        InputError: What is wrong, in words (never numpy's multi-line text).
    """
    import numpy as np

    fmt = np.lib.format
    readers = {(1, 0): (fmt.read_array_header_1_0, 2), (2, 0): (fmt.read_array_header_2_0, 4)}
    try:
        version = fmt.read_magic(handle)
    except ValueError as exc:
        raise _damaged(what, path, _first_line(exc)) from None
    if version not in readers:
        raise InputError(f"{what} {path} uses .npy format version {version[0]}.{version[1]}, "
                         f"which holds structured records; save plain arrays of numbers "
                         f"(format 1.0 or 2.0) with numpy.save")
    reader, length_bytes = readers[version]
    start = handle.tell()
    length = int.from_bytes(handle.read(length_bytes), "little")
    if length > NPY_MAX_HEADER:
        raise InputError(f"{what} {path} has a .npy header of {length} bytes, more than numpy "
                         f"reads safely ({NPY_MAX_HEADER}): the file is damaged or crafted; "
                         f"save the arrays again with numpy.save")
    handle.seek(start)
    try:
        shape, fortran_order, dtype = reader(handle, max_header_size=NPY_MAX_HEADER)
    except (ValueError, SyntaxError, RecursionError, MemoryError, tokenize.TokenError) as exc:
        # numpy parses the header as a Python literal (tokenize and ast raise these)
        raise _damaged(what, path, f"unreadable header: {_first_line(exc)}") from None
    if any(dim < 0 for dim in shape):
        raise _damaged(what, path, f"its header gives the negative size {tuple(shape)}")
    if dtype.hasobject:
        raise _pickled(what, path)
    if dtype.kind not in _NUMBER_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"{what} {path} holds {dtype} values, not numbers; save the model's "
                         f"inputs as arrays of numbers (float32)")
    if not shape:
        raise InputError(f"{what} {path} holds a single number (a 0-d array), not a batch of "
                         f"samples; save an array shaped (N, ...) with N samples")
    return tuple(shape), fortran_order, dtype


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


def _read_npy(handle, what: str, path: Path, size: int, lazy: bool):
    """The array of the .npy in ``handle`` (``size`` bytes: the file, or the .npz member), or
    :class:`NpyRows` over it (``lazy``: a C-order .npy file)."""
    import numpy as np

    shape, fortran_order, dtype = _npy_header(handle, what, path)
    offset = handle.tell()
    expected = offset + int(math.prod(shape)) * dtype.itemsize
    if size < expected:
        raise _damaged(what, path, f"it holds {size} bytes, its header promises {expected}")
    if lazy and not fortran_order:
        return NpyRows(path, shape, dtype, offset)
    handle.seek(0)
    try:
        return np.lib.format.read_array(handle, allow_pickle=False,
                                        max_header_size=NPY_MAX_HEADER)
    except MemoryError:
        raise InputError(f"{what} {path} holds an array of {expected / 2**30:.1f} GiB, more than "
                         f"this machine can hold in memory; save it as one .npy (read in "
                         f"chunks by trt-exit run) or split it") from None
    except ValueError as exc:  # the data ends early
        raise _damaged(what, path, _first_line(exc)) from None


def _read_npz(path: Path, what: str) -> dict[str, Any]:
    """Every array of an .npz archive by name (read in full, then the file is closed)."""
    import zipfile
    import zlib

    arrays: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                name = info.filename
                if not name.endswith(".npy"):
                    raise InputError(f"{what} {path} holds {name!r}, which is not an array (an "
                                     f".npz holds only .npy members); save it with numpy.savez")
                key = name[: -len(".npy")]
                if key in arrays:
                    raise InputError(f"{what} {path} holds two arrays named {key!r}; save it "
                                     f"again with numpy.savez")
                with archive.open(info) as member:
                    arrays[key] = _read_npy(member, what, Path(f"{path}[{key}]"),
                                            info.file_size, lazy=False)
    except InputError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            OSError, ValueError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression;
        # ValueError: a member name that is not UTF-8, a bad seek in a damaged member.
        raise InputError(f"{what} {path} is a damaged .npz archive ({_first_line(exc)}); save "
                         f"the arrays again with numpy.savez") from None
    if not arrays:
        raise InputError(f"{what} {path} holds no arrays; save the inputs with numpy.savez")
    return arrays


def load_arrays(path: str | os.PathLike, what: str = "array file", lazy: bool = False) -> Any:
    """A user's array file: ``.npz`` -> ``{name: array}`` (read in full, file closed), ``.npy`` ->
    one array. Never unpickles; every array holds numbers and has at least one dimension.

    Args:
        lazy: ``.npy`` only: return :class:`NpyRows`, which reads rows from disk as they are
            sliced (for inputs larger than memory, run in chunks).

    Raises:
        InputError: ``path`` is missing, not a regular file, or not an array file of numbers:
            damaged, truncated, pickled objects, a 0-d array, a crafted header (the message
            starts with ``what``).
    """
    path = check_input_file(path, what)
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_NPY_MAGIC))
            if head.startswith(_NPY_MAGIC):
                handle.seek(0)
                return _read_npy(handle, what, path, path.stat().st_size, lazy)
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({path_problem(exc)})") from None
    if head.startswith(_ZIP_MAGIC):
        return _read_npz(path, what)
    shown = "it is empty" if not head else f"it starts with {head!r}"
    raise InputError(f"{what} {path} is not a .npy or .npz array file ({shown}); save arrays "
                     f"with numpy.save / numpy.savez")


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
    problem = path_text_problem(folder)
    if problem:
        raise OutputError(f"{what} {shown_path(folder)}: {problem}")
    try:
        return _check_output_dir(folder, what, create)
    except (OSError, ValueError) as exc:  # e.g. ELOOP, EACCES on a part of the path
        raise OutputError(f"{what}: cannot use folder {shown_path(folder)} "
                          f"({path_problem(exc)})") from None


def _check_output_dir(folder: Path, what: str, create: bool) -> Path:
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


def check_folder_outside(folder: str | os.PathLike, model_root: str | os.PathLike,
                         what: str, advice: str) -> Path:
    """Refuses an output folder strictly inside a model directory (also through symlinks): a
    model directory holds only its own files, and a copy or repository of the model inside it
    would be copied along with it, or mistaken for its files.

    Raises:
        OutputError: It is inside.
    """
    folder, root = Path(folder), Path(model_root)
    try:
        resolved = folder.resolve()
        inside = resolved != root.resolve() and resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop: the folder checks say so
        return folder
    if inside:
        raise OutputError(f"{what} {folder} is inside the model directory {root}; {advice} "
                          f"(a model directory holds only its own files)")
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
    problem = path_text_problem(path)
    if problem:
        raise OutputError(f"{what} {shown_path(path)}: {problem}")
    try:
        is_dir, exists, is_file = path.is_dir(), path.exists(), path.is_file()
    except (OSError, ValueError) as exc:
        raise OutputError(f"{what} {shown_path(path)} cannot be used ({path_problem(exc)})"
                          ) from None
    if is_dir:
        raise OutputError(f"{what} {path} is a folder; name a file")
    if exists and not is_file:
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
