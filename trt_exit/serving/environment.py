"""What a Triton server process needs from this machine: the extra, the Python library path,
free ports, and the bundled ``tritonserver`` binary.

Triton's Python backend runs models in a stub process that loads ``libpython3.X.so`` by name.
On an interpreter built outside the system (pyenv, a venv made from it) the dynamic loader finds
the system's libpython first, and the model fails to load with ``'_thread.RLock' object has no
attribute '_recursion_count'``. Putting this interpreter's ``LIBDIR`` first on
``LD_LIBRARY_PATH`` makes the stub load the right one; :func:`stub_environment` does that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
from pathlib import Path

from trt_exit.errors import TrtExitError, require


class ServingError(TrtExitError):
    """A server cannot start or be reached (port in use, server down, bad reply)."""


def require_pytriton(purpose: str):
    """Imports ``pytriton`` or raises a clear error naming the ``serve`` extra."""
    return require("pytriton", "serve", purpose,
                   "nvidia-pytriton needs numpy<2; use a virtual environment for serving if "
                   "other packages there need numpy 2")


def python_libdir() -> str | None:
    """This interpreter's shared-library directory (where ``libpython3.X.so`` is)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    return libdir if libdir and Path(libdir).is_dir() else None


def stub_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this interpreter's lib directory first on
    ``LD_LIBRARY_PATH`` and its bin directory first on ``PATH`` (so the Python-backend stub
    loads this Python and finds its site-packages)."""
    env = dict(os.environ if env is None else env)
    libdir = python_libdir()
    if libdir:
        rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])
    bindir = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    env["PATH"] = os.pathsep.join([bindir, *rest])
    return env


def check_port_free(address: str, port: int, option: str) -> None:
    """Raises :class:`ServingError` naming ``option`` if something listens on ``address:port``.

    ``SO_REUSEADDR`` is set as Triton sets it, so a port in TIME_WAIT counts as free."""
    if not 0 < port < 65536:
        raise ServingError(f"{option} {port} is not a port number (1-65535)")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            raise ServingError(
                f"cannot listen on {address}:{port} ({exc.strerror}): another server is using "
                f"it, or the address is not this machine's; choose another with {option}"
            ) from exc


def free_port(address: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def bundled_tritonserver(workdir: str | os.PathLike) -> tuple[Path, Path]:
    """Lays out the ``tritonserver`` that ships in the nvidia-pytriton wheel, with the
    Python-backend stub for this interpreter, under ``workdir`` (once; later calls reuse it).

    Returns:
        The ``tritonserver`` binary and the backend directory to pass as
        ``--backend-directory``. Run the binary with :func:`tritonserver_environment`.
    """
    pytriton = require_pytriton("running the bundled tritonserver")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServingError(f"nvidia-pytriton has no Python-backend stub for Python {version} "
                           f"(looked for {stub})")
    root = Path(workdir) / "tritonserver"
    if not root.exists():  # copied aside, then renamed: a concurrent first run sees all or none
        Path(workdir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=workdir))
        try:
            shutil.copytree(dist, staging / "tritonserver",
                            ignore=shutil.ignore_patterns("python_backend_stubs"))
            shutil.copy2(stub, staging / "tritonserver" / "backends" / "python"
                         / "triton_python_backend_stub")
            with contextlib.suppress(OSError):  # another run was faster
                os.rename(staging / "tritonserver", root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root / "bin" / "tritonserver", root / "backends"


def pytriton_home() -> Path:
    """PyTriton's home (``$PYTRITON_HOME``, default ``~/.cache/pytriton``)."""
    require_pytriton("serving")
    from pytriton.constants import PYTRITON_HOME

    return Path(PYTRITON_HOME)


def bundled_tritonserver_dir() -> Path:
    """Where :func:`bundled_tritonserver` keeps its copy for ``trt-exit tritonserver``: one per
    nvidia-pytriton version and Python version, in PyTriton's home."""
    from importlib.metadata import version

    return pytriton_home() / (f"bundled-{version('nvidia-pytriton')}-"
                              f"py{sys.version_info[0]}.{sys.version_info[1]}")


def tritonserver_environment() -> dict[str, str]:
    """The environment for the bundled ``tritonserver``: :func:`stub_environment`, plus the
    wheel's own libraries on ``LD_LIBRARY_PATH``."""
    pytriton = require_pytriton("running the bundled tritonserver")
    env = stub_environment()
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"] + os.pathsep + str(libs)
    return env
