"""A server in a child process: ``trt-exit serve`` or the bundled ``tritonserver`` on a
repository, started, waited for until its model is ready, and stopped within a bounded time.

Used by the load test (benchmarks/serve.py) and the tests; on loopback by default::

    ports = ServerPorts.free()
    with ServerProcess.serve("runs/demo", ports, "multi_exit_vit_digits") as server:
        ...  # server.ports.grpc_url
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trt_exit.serving.environment import (
    ServingError,
    bundled_tritonserver,
    free_port,
    tritonserver_environment,
)


@dataclass(frozen=True)
class ServerPorts:
    """Address and ports of one server."""

    http: int
    grpc: int
    metrics: int
    address: str = "127.0.0.1"

    @classmethod
    def free(cls, address: str = "127.0.0.1") -> "ServerPorts":
        """Three ports nothing listens on now."""
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port(address))
        http, grpc, metrics = sorted(ports)
        return cls(http, grpc, metrics, address)

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.address}:{self.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics}/metrics"


class ServerProcess:
    """A server command run as a child process (its output goes to ``log``).

    Args:
        command: The command line.
        ports: Where it listens.
        model_name: The model whose readiness :meth:`start` waits for.
        log: File for the server's stdout and stderr.
        env: Environment (default: this process's).
    """

    def __init__(self, command: list[str], ports: ServerPorts, model_name: str,
                 log: str | os.PathLike, env: dict[str, str] | None = None):
        self.command = command
        self.ports = ports
        self.model_name = model_name
        self.log = Path(log)
        self.env = env
        self.process: subprocess.Popen | None = None
        #: Processes of the server's group still running after it stopped (then killed).
        self.leftovers = 0
        #: A directory removed once the server has stopped.
        self.scratch: str | None = None

    @classmethod
    def serve(cls, model_dir: str | os.PathLike, ports: ServerPorts, model_name: str,
              log: str | os.PathLike, *options: str,
              home: str | os.PathLike | None = None) -> "ServerProcess":
        """``trt-exit serve model_dir`` (this interpreter) with ``ports`` and ``options``.

        ``home``: PyTriton's home (``PYTRITON_HOME``: the servers' records and workspaces);
        default: a new directory removed on stop, so that a test or benchmark that kills its
        server leaves nothing in ``~/.cache/pytriton``. Servers that share a home clean up after
        each other (see :mod:`~trt_exit.serving.leftovers`)."""
        command = [sys.executable, "-m", "trt_exit", "serve", str(model_dir),
                   "--address", ports.address, "--http-port", str(ports.http),
                   "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
                   "--exit-timeout-s", "3", *options]
        # Short: the workspace in it holds Unix sockets (at most 107 bytes a path).
        scratch = None if home is not None else tempfile.mkdtemp(prefix="pytriton-")
        server = cls(command, ports, model_name, log,
                     env={**os.environ, "PYTRITON_HOME": str(home or scratch)})
        server.scratch = scratch
        return server

    @classmethod
    def tritonserver(cls, repository: str | os.PathLike, ports: ServerPorts, model_name: str,
                     log: str | os.PathLike, workdir: str | os.PathLike) -> "ServerProcess":
        """The ``tritonserver`` bundled with nvidia-pytriton on a model repository."""
        binary, backends = bundled_tritonserver(workdir)
        command = [str(binary), f"--model-repository={Path(repository).resolve()}",
                   f"--backend-directory={backends}",
                   f"--http-address={ports.address}", f"--grpc-address={ports.address}",
                   f"--metrics-address={ports.address}", f"--http-port={ports.http}",
                   f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}",
                   "--exit-timeout-secs=3"]
        return cls(command, ports, model_name, log, env=tritonserver_environment())

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the command and waits until the model is ready.

        Raises:
            ServingError: The process exited, or the model was not ready within ``timeout_s``
                (the process is stopped; the message ends with its log's last lines).
        """
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        url = f"{self.ports.http_url}/v2/models/{self.model_name}/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # removes its scratch directory and any stray process
                raise ServingError(f"server exited with status {self.process.returncode} before "
                                   f"it was ready: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ServingError(f"model {self.model_name} not ready within {timeout_s:.0f} s: "
                           f"{self.log_tail()}")

    def send_signal(self, signum: int) -> None:
        """Sends ``signum`` to the server process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Waits for the process to exit; returns its status."""
        return self.process.wait(timeout=timeout_s)

    def stop(self, signum: int = signal.SIGINT, timeout_s: float = 30.0) -> int | None:
        """Stops the server with ``signum``; kills its process group after ``timeout_s``.

        Returns:
            The exit status (None if it had to be killed).
        """
        if self.process is None:
            return None
        status = self.process.returncode
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                status = self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                status = None
        self.leftovers = self._kill_group()
        if status is None:
            self.process.wait(timeout=10)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        return status

    def _kill_group(self, grace_s: float = 2.0) -> int:
        """Kills what is left of the server's process group a moment (``grace_s``) after the
        server exited (a Python-backend stub that missed the shutdown; not the helpers that end
        with their parent, such as multiprocessing's resource tracker); returns how many
        processes that was."""
        pgid = self.process.pid
        deadline = time.monotonic() + grace_s
        while True:
            members = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        if os.getpgid(int(entry.name)) == pgid and int(entry.name) != os.getpid():
                            members.append(int(entry.name))
                    except (ProcessLookupError, PermissionError):
                        continue
            alive = [pid for pid in members if _state(pid) not in ("Z", "X", "")]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if members:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(alive)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _state(pid: int) -> str:
    """A process's state letter (``R``, ``S``, ``Z`` ...), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
