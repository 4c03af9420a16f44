"""An executor that runs the model on a Triton server (``trt-exit serve`` or a ``triton-repo``).

:class:`RemoteExecutor` has the executors' ``run(inputs, policy) -> ExitResults`` and is a
context manager, so the live pipeline (``trt-exit count --server grpc://host:8001``) sends each
frame and its audio window to a server instead of running the model in-process, and many
camera processes share the server's batches. The exit policy is the server's.

A server that is not there when the executor opens is retried for ``connect_s`` (a server still
starting); one that stops answering mid-stream (a restart, a crash, a network glitch) is retried
for ``reconnect_s`` with a fresh connection each time, so a rolling restart of the server costs
the clients a pause, not their run. While Triton shuts down or starts it answers ``NOT_FOUND``
for the model it is unloading or loading; that is retried like a refused connection. Then
:class:`~trt_exit.serving.environment.ServingError` says which server and what happened (and
that it was stopping, when it was). A request the server refuses (bad values) is an
:class:`InputError`, not retried.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.parse
from typing import Any

import numpy as np

from trt_exit.errors import ConfigError, InputError, require
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import ExitResults, validate_inputs
from trt_exit.serving.environment import ServingError
from trt_exit.serving.model_io import CONFIDENCE, ERROR, EXIT_INDEX, OUTPUT, served_inputs

log = logging.getLogger(__name__)

SCHEMES = ("grpc", "http")
#: gRPC status codes worth another try (the server is starting, restarting or overloaded).
TRANSIENT_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
                  "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.NOT_FOUND"}
#: HTTP statuses worth another try (404: the model is unloading or loading).
TRANSIENT_HTTP = {"404", "429", "502", "503", "504"}


class Interrupted(KeyboardInterrupt):
    """The stop event was set while waiting for the server to answer again."""


def parse_server_url(url: str) -> tuple[str, str, str | None]:
    """``grpc://host:port[/model]`` or ``http://...`` -> (scheme, ``host:port``, model name)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in SCHEMES or not parsed.hostname or parsed.port is None:
        raise ConfigError(f"bad server URL {url!r}; use grpc://HOST:PORT or http://HOST:PORT "
                          f"(optionally /MODEL_NAME), e.g. grpc://127.0.0.1:8001")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    model = parsed.path.strip("/") or None
    return parsed.scheme, f"{host}:{parsed.port}", model


class RemoteExecutor:
    """Runs batches on a Triton server.

    Args:
        url: ``grpc://HOST:PORT`` (``trt-exit serve``'s gRPC port, default 8001) or
            ``http://HOST:PORT`` (8000), optionally with ``/MODEL_NAME``.
        manifest: The served model's manifest (or its directory): inputs and the task.
        model_name: Served model name (default: from the URL, else the manifest's name).
        timeout_s: Per-request timeout.
        connect_s: How long opening keeps trying a server that does not answer, or whose model
            is not ready yet.
        reconnect_s: How long a request keeps trying a server that stopped answering (is
            restarting, crashed, or is unreachable) before :meth:`run` gives up.
        retry_wait_s: Wait before the first retry; doubles up to ``max_wait_s``.
        max_wait_s: Longest wait between tries (how soon a server that is back is noticed).
        stop_event: When set (Ctrl-C, SIGTERM), a wait for the server ends at once with
            :class:`Interrupted`.

    Raises:
        ServingError: The server or the model is not ready within ``connect_s``.
        ConfigError: The served model's inputs differ from the manifest's.
    """

    def __init__(self, url: str, manifest: Manifest | str, model_name: str | None = None,
                 timeout_s: float = 10.0, connect_s: float = 4.0, reconnect_s: float = 60.0,
                 retry_wait_s: float = 0.25, max_wait_s: float = 1.0,
                 stop_event: threading.Event | None = None):
        self.url = url
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.scheme, self.address, url_model = parse_server_url(url)
        self.model_name = model_name or url_model or self.manifest.name
        self.timeout_s = timeout_s
        self.connect_s = connect_s
        self.reconnect_s = reconnect_s
        self.retry_wait_s = retry_wait_s
        self.max_wait_s = max_wait_s
        self.stop_event = stop_event or threading.Event()
        self.num_exits = self.manifest.num_exits
        self.policy = None
        self._module = require(f"tritonclient.{self.scheme}", "serve",
                               f"sending frames to a Triton server over {self.scheme}")
        self._utils = require("tritonclient.utils", "serve", "the Triton client")
        self._client = None
        self._connect()
        try:
            self._with_retries("check that the model is ready", self._check_model, connect_s)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()

    def _connect(self) -> None:
        """A fresh client (a new gRPC channel has no reconnection backoff left over from an
        outage; a new HTTP pool has no connection the old server closed)."""
        self.close()
        if self.scheme == "grpc":
            self._client = self._module.InferenceServerClient(self.address)
        else:
            self._client = self._module.InferenceServerClient(
                self.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)

    def __enter__(self) -> "RemoteExecutor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ running

    def run(self, inputs: Any, policy=None) -> ExitResults:
        """Sends one batch; returns per-sample results like the in-process executors
        (``latency_ms`` is the round trip).

        Raises:
            ConfigError: A policy was passed (the server's policy decides).
            InputError: The inputs are invalid (checked here), or the server refused them.
            ServingError: The server did not answer after the retries.
        """
        if policy is not None:
            raise ConfigError("the exit policy of a served model is the server's: start "
                              "trt-exit serve with --policy instead")
        feeds = validate_inputs(self.manifest, inputs)
        batch = len(next(iter(feeds.values())))
        began = time.perf_counter()
        parts = []
        for start in range(0, batch, self.max_batch):  # the server refuses larger batches
            chunk = {name: value[start:start + self.max_batch] for name, value in feeds.items()}
            parts.append(self._with_retries("infer", self._infer, self.reconnect_s, chunk))
        latency_ms = (time.perf_counter() - began) * 1e3
        if ERROR in self._output_names:
            reasons = {bytes(e).decode() for reply in parts
                       for e in reply.as_numpy(ERROR).reshape(-1) if e}
            if reasons:
                raise InputError(f"server {self.url} refused the request: {'; '.join(reasons)}")
        joined = {name: np.concatenate([reply.as_numpy(name) for reply in parts])
                  for name in (EXIT_INDEX, OUTPUT, CONFIDENCE)}
        return ExitResults(
            exit_index=joined[EXIT_INDEX].reshape(-1).astype(np.int32),
            output=joined[OUTPUT].astype(np.float32, copy=False),
            confidence=joined[CONFIDENCE].reshape(-1).astype(np.float32),
            task=self.manifest.task, latency_ms=latency_ms,
            value_columns=self.manifest.value_columns)

    def _infer(self, feeds: dict[str, np.ndarray]):
        requests = []
        for name, value in feeds.items():
            tensor = self._module.InferInput(name, list(value.shape),
                                             self._utils.np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            requests.append(tensor)
        if self.scheme == "grpc":
            return self._client.infer(self.model_name, requests, client_timeout=self.timeout_s)
        return self._client.infer(self.model_name, requests)

    def _check_model(self) -> None:
        if not self._client.is_model_ready(self.model_name):
            raise ServingError(f"server {self.url} has no ready model {self.model_name!r}")
        metadata = self._client.get_model_metadata(self.model_name)
        config = self._client.get_model_config(self.model_name)
        if self.scheme == "grpc":
            metadata = {"inputs": [{"name": t.name, "shape": list(t.shape)} for t in metadata.inputs],
                        "outputs": [{"name": t.name} for t in metadata.outputs]}
            config = {"max_batch_size": config.config.max_batch_size}
        self._output_names = [t["name"] for t in metadata["outputs"]]
        self.max_batch = max(1, int(config.get("max_batch_size") or 1))
        served = {t["name"]: [int(d) for d in t["shape"][1:]] for t in metadata["inputs"]}
        expected = {io.name: list(io.dims) for io in served_inputs(self.manifest)}
        if served != expected:
            raise ConfigError(f"model {self.model_name!r} at {self.url} takes {served}, but "
                              f"{self.manifest.path} describes {expected}: serve this model "
                              f"directory, or pass the one the server runs")

    def _with_retries(self, what: str, call, budget_s: float, *args):
        """``call(*args)``, tried again while the server does not answer or is stopping or
        starting, for up to ``budget_s`` after the first failure (which may itself have taken
        ``timeout_s``: a server that accepts requests but never answers them)."""
        began = None
        wait = self.retry_wait_s
        tries, stopping = 0, False
        while True:
            tries += 1
            try:
                result = call(*args)
            except self._utils.InferenceServerException as exc:
                status = str(exc.status() or "")
                transient = TRANSIENT_GRPC if self.scheme == "grpc" else TRANSIENT_HTTP
                if status not in transient and not (self.scheme == "http" and not status):
                    raise self._refused(exc) from exc
                error = exc
                # Triton answers NOT_FOUND for a model it is unloading or has not loaded yet.
                unloaded = status in ("StatusCode.NOT_FOUND", "404")
            except (OSError, http.client.HTTPException, ServingError) as exc:
                error, unloaded = exc, False  # refused, reset, closed, timed out; not ready yet
            else:
                if began is not None:
                    log.warning("server %s answers again (%s, after %.1f s)", self.url, what,
                                time.monotonic() - began)
                return result
            began = time.monotonic() if began is None else began
            waited = time.monotonic() - began
            if waited + wait > budget_s:
                stopping = stopping or unloaded
                break
            if tries == 1 or (unloaded and not stopping):  # what happened, and when it changes
                state = (f"its model {self.model_name!r} is not available: the server is stopping "
                         f"or restarting" if unloaded else _one_line(error))
                log.warning("server %s: %s failed (%s); trying again for up to %.0f s", self.url,
                            what, state, budget_s - waited)
            stopping = stopping or unloaded
            if self.stop_event.wait(wait):
                raise Interrupted(f"stopped while waiting for server {self.url}")
            wait = min(wait * 2, self.max_wait_s)
            self._connect()
        if stopping:
            raise ServingError(
                f"server {self.url} stopped serving model {self.model_name!r} (it was stopping or "
                f"restarting) and did not serve it again within {budget_s:g} s ({tries} tries; "
                f"last: {_one_line(error)}); restart it (trt-exit serve), or allow more time "
                f"(trt-exit count --reconnect-s)") from error
        raise ServingError(f"server {self.url} did not answer ({what}) within {budget_s:g} s "
                           f"({tries} tries): {_one_line(error)}; start it with trt-exit serve, "
                           f"or check the address") from error

    def _refused(self, exc) -> Exception:
        message = _one_line(exc)
        if "unexpected shape" in message or "data-type" in message or "NaN or Inf" in message:
            return InputError(f"server {self.url} refused the request: {message}")
        return ServingError(f"server {self.url}: {message}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
