"""What a running ``trt-exit serve`` owns on the machine, and removing it: at the server's own
stop, and at the next start when the server that made it died without stopping (SIGKILL, the
OOM killer, a crash of tritonserver).

A server owns:

* its record, ``$PYTRITON_HOME/trt-exit-<pid>/`` (``~/.cache/pytriton`` by default): a lock file
  the server holds (``flock``) for as long as it lives, ``server.json`` (who, and what to remove)
  and ``ws/``, PyTriton's workspace (a 22 MB copy of tritonserver and its Unix sockets);
* ``tritonserver`` and its Python-backend stubs: their binaries are in ``ws/``, which is how
  they are found once their parent is gone (a stub whose tritonserver was killed is reparented
  to init, ignores SIGTERM and hangs in its own exit);
* shared memory in ``/dev/shm``: the Python backend's region (its name prefix is on
  tritonserver's command line) and PyTriton's tensor blocks (``psm_*``, recorded as this
  process maps them);
* two directories Triton makes in ``/tmp`` (the path is compiled into it): the model's files
  (``folderXXXXXX``, whose ``config.pbtxt`` names the workspace) and the Python backend's
  ``python_env_XXXXXX`` (empty; recorded when exactly one appeared while the server started).

The kernel drops a ``flock`` when its process dies, however it died: a record whose lock is free
belongs to a dead server (its process id, start time and boot are checked as well). Only such
records are cleaned; a live server's files are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from trt_exit.fileio import _try_lock
from trt_exit.serving.environment import ServingError

try:  # POSIX only; elsewhere nothing is recorded and nothing is cleaned
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

RECORD_PREFIX = "trt-exit-"
_NEW_PREFIX = ".trt-exit-new-"
_LOCK, _INFO, _WORKSPACE = "lock", "server.json", "ws"
#: Where Triton makes its temporary directories (hard-coded in tritonserver, not $TMPDIR).
TRITON_TMP = Path("/tmp")
SHM = Path("/dev/shm")
#: Names of what may be removed: Python's SharedMemory segments, the Python backend's region
#: prefix, Triton's temporary directories.
_PSM = re.compile(r"^psm_[0-9a-f]{8}$")
_SHM_PREFIX = re.compile(r"shm-region-prefix-name=([A-Za-z0-9_.-]+)")
_PYTHON_ENV = re.compile(r"^python_env_[A-Za-z0-9]{6}$")
_WORKSPACE_PATH = re.compile(r'key:\s*"workspace-path"\s*value\s*\{\s*string_value:\s*"([^"]*)"')


@dataclass
class Cleanup:
    """What a cleanup removed."""

    pid: int | None = None
    killed: list[str] = field(default_factory=list)   # "tritonserver (pid 123)"
    removed: list[str] = field(default_factory=list)  # paths

    def describe(self) -> str:
        parts = []
        if self.killed:
            parts.append(f"killed {', '.join(self.killed)}")
        shm = [p for p in self.removed if p.startswith(str(SHM))]
        dirs = [p for p in self.removed if not p.startswith(str(SHM))]
        if shm:
            parts.append(f"removed {len(shm)} shared-memory segment(s)")
        if dirs:
            parts.append(f"removed {', '.join(dirs)}")
        return "; ".join(parts) or "nothing left"


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks after boot; with the pid, unique within a boot), or
    None if it is gone or a zombie."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _executable(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:  # gone, a kernel thread, or another user's
        return None


def processes_under(root: Path) -> dict[int, str]:
    """Live processes whose executable lies in ``root`` (pid -> executable name)."""
    prefix = str(root) + os.sep
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        exe = _executable(int(entry.name))
        if exe and exe.startswith(prefix) and start_time(int(entry.name)):
            found[int(entry.name)] = Path(exe).name
    return found


def _children(pids: set[int]) -> set[int]:
    """All descendants of ``pids``."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields:
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = set(pids)
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _kill(processes: dict[int, str], wait_s: float = 5.0) -> list[str]:
    """SIGKILLs ``processes`` (checked to be what they were by their start time) and waits until
    they and their children are gone; returns ``"name (pid N)"`` of each one killed.

    The children are left to end themselves: a stub's block store gets its parent-death signal,
    and the stub's multiprocessing resource tracker then unlinks the shared memory it tracked."""
    started = {pid: start_time(pid) for pid in [*processes, *_children(set(processes))]}
    killed = []
    for pid, name in processes.items():
        if started[pid] is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{name} (pid {pid})")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(
            began is not None and start_time(pid) == began for pid, began in started.items()):
        time.sleep(0.05)
    return killed


def _mapped_shm(pid: int | str) -> set[str]:
    """Names of the /dev/shm files a process maps."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.rsplit("/", 1)[1] for line in lines if f" {SHM}/" in line}


# --------------------------------------------------------------------------- records


class ServerRecord:
    """The record of this process's server (see the module docstring). Create it with
    :meth:`create`, pass :attr:`workspace` to PyTriton, call :meth:`refresh` while serving and
    :meth:`close` after PyTriton stopped."""

    def __init__(self, root: Path, lock_fd: int, info: dict):
        self.root = root
        self._lock_fd = lock_fd
        self.info = info

    @property
    def workspace(self) -> Path:
        """PyTriton's workspace (PyTriton creates it)."""
        return self.root / _WORKSPACE

    @classmethod
    def create(cls, home: str | os.PathLike) -> "ServerRecord | None":
        """The record of this process in ``home`` (None where ``flock`` is unavailable).

        The directory is made and locked under a temporary name, then renamed: a cleaner never
        sees a record whose owner does not hold its lock yet."""
        if fcntl is None:  # pragma: no cover
            return None
        home = Path(home).resolve()
        staging = fd = None
        try:
            home.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=home))
            fd = os.open(staging / _LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # a cleaner probing it lets go at once
            info = {"pid": os.getpid(), "start_time": start_time(os.getpid()),
                    "boot_id": boot_id(), "created": time.time(), "shm_prefix": None, "shm": [],
                    "python_env": []}
            record = cls(staging, fd, info)
            record._save()
            final = home / f"{RECORD_PREFIX}{os.getpid()}"
            if final.exists():  # a dead process's that had this pid
                clean_record(final)
            os.rename(staging, final)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise ServingError(f"cannot write the server's record in {home} ({exc.strerror}); "
                               f"set PYTRITON_HOME to a directory you can write") from exc
        record.root = final
        return record

    def note_python_env(self, before: set[Path]) -> None:
        """Records the Python backend's ``/tmp/python_env_*`` directory: the one that appeared
        since ``before`` (taken before tritonserver started), if exactly one did."""
        new = set(TRITON_TMP.glob("python_env_*")) - before
        if len(new) == 1:
            self.info["python_env"] = [new.pop().name]
            self._save()

    def refresh(self) -> None:
        """Records the shared memory the server uses now (cheap; call it now and then)."""
        shm = {name for name in _mapped_shm("self") if _PSM.match(name)}
        prefix = self.info["shm_prefix"]
        for pid in processes_under(self.root):
            shm |= {name for name in _mapped_shm(pid) if _PSM.match(name)}
            if prefix is None:
                with contextlib.suppress(OSError):
                    match = _SHM_PREFIX.search(Path(f"/proc/{pid}/cmdline").read_bytes()
                                               .replace(b"\0", b" ").decode(errors="replace"))
                    prefix = match.group(1) if match else None
        shm = {name for name in shm | set(self.info["shm"]) if (SHM / name).exists()}
        if prefix != self.info["shm_prefix"] or shm != set(self.info["shm"]):
            self.info.update(shm_prefix=prefix, shm=sorted(shm))
            self._save()

    def close(self) -> Cleanup:
        """Kills what is left of the server's processes, removes its shared memory, temporary
        directories and record, and releases the lock. Call it after PyTriton stopped."""
        if self._lock_fd is None:
            return Cleanup(pid=os.getpid())
        try:
            return _remove(self.root, self.info)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _save(self) -> None:
        tmp = self.root / f".{_INFO}.tmp"
        tmp.write_text(json.dumps(self.info))
        os.replace(tmp, self.root / _INFO)


def _remove(root: Path, info: dict) -> Cleanup:
    """Removes everything ``info`` (a record's server.json) and ``root`` account for."""
    done = Cleanup(pid=info.get("pid"))
    done.killed = _kill(processes_under(root))
    names = {name for name in info.get("shm") or [] if isinstance(name, str) and _PSM.match(name)}
    prefix = info.get("shm_prefix")
    if isinstance(prefix, str) and re.fullmatch(r"[A-Za-z0-9_.-]{8,}", prefix):
        names |= {p.name for p in SHM.glob(f"{prefix}*")}
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError):
            (SHM / name).unlink()
            done.removed.append(str(SHM / name))
    workspace = str(root / _WORKSPACE)
    for folder in TRITON_TMP.glob("folder*"):
        try:
            if folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            config = (folder / "config.pbtxt").read_text(errors="replace")[:1 << 16]
        except OSError:  # gone, or not a model folder
            continue
        match = _WORKSPACE_PATH.search(config)
        if match and match.group(1) == workspace:
            shutil.rmtree(folder, ignore_errors=True)
            done.removed.append(str(folder))
    for name in info.get("python_env") or []:
        if isinstance(name, str) and _PYTHON_ENV.match(name):
            with contextlib.suppress(OSError):  # gone, or not empty: not ours to empty
                (TRITON_TMP / name).rmdir()
                done.removed.append(str(TRITON_TMP / name))
    if (root / _WORKSPACE).exists():
        done.removed.append(str(root / _WORKSPACE))
    shutil.rmtree(root, ignore_errors=True)
    return done


def _read_info(root: Path) -> dict | None:
    try:
        info = json.loads((root / _INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _alive(info: dict) -> bool:
    pid = info.get("pid")
    return (isinstance(pid, int) and info.get("boot_id") == boot_id()
            and info.get("start_time") is not None and start_time(pid) == info.get("start_time"))


def clean_record(root: Path) -> Cleanup | None:
    """Cleans one record if its server is dead (its lock is free); None if it is alive, being
    created, or not this user's."""
    try:
        if root.stat().st_uid != os.getuid():
            return None
        fd = os.open(root / _LOCK, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # gone (another cleaner was faster), or a record being made
        return None
    try:
        if not _try_lock(fd):
            return None  # its server holds the lock: alive
        info = _read_info(root)
        if info is None or _alive(info):
            return None  # being made (not written yet), or a lock that does not work here
        return _remove(root, info)
    finally:
        os.close(fd)


def clean_stale_servers(home: str | os.PathLike) -> list[Cleanup]:
    """Removes what dead ``trt-exit serve`` processes left (records in ``home`` whose lock is
    free): their processes, shared memory, temporary directories and workspaces."""
    if fcntl is None:  # pragma: no cover
        return []
    home = Path(home)
    done = []
    for root in sorted([*home.glob(f"{RECORD_PREFIX}*"), *home.glob(f"{_NEW_PREFIX}*")]):
        if root.is_dir() and not root.is_symlink():
            cleaned = clean_record(root)
            if cleaned is not None:
                done.append(cleaned)
    return done
