"""trt-exit serve: a real PyTriton server (trt-exit serve in a child process) on 127.0.0.1,
queried over HTTP and gRPC and compared with the in-process executor sample by sample."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from trt_exit.cli import main
from trt_exit.runtime.executor import Executor

MODEL = "multi_exit_vit_tiny_test"


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is not None,
                    reason="checks the message shown when nvidia-pytriton is missing")
def test_without_the_extra_serve_names_it(tiny_tuned, capsys):
    assert main(["serve", str(tiny_tuned), "--http-port", "1"]) == 2
    assert "pip install 'trt-exit[serve]'" in capsys.readouterr().err


def test_tritonserver_without_a_repository_is_a_clear_error(tmp_path, capsys):
    assert main(["tritonserver", "--model-repository", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory; write one with trt-exit triton-repo" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def server(tiny_tuned, tmp_path_factory):
    from trt_exit.serving.process import ServerPorts, ServerProcess

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process = ServerProcess.serve(tiny_tuned, ServerPorts.free(), MODEL, log,
                                  "--max-batch", "16", "--max-queue-delay-us", "2000",
                                  "--exit-timeout-s", "10")
    with process:
        yield process


@pytest.fixture(scope="module")
def reference(tiny_tuned, digits):
    images = digits["test"].inputs["image"][:48]
    with Executor(tiny_tuned) as executor:
        results = executor.run(images)
    assert len(set(results.exit_index.tolist())) > 1  # mixed exits: the test means something
    return images, results


def _raw_client(server, scheme):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if scheme == "grpc" else httpclient
    port = server.ports.grpc if scheme == "grpc" else server.ports.http
    return module, module.InferenceServerClient(f"127.0.0.1:{port}")


def _request(module, name, array, dtype="FP32"):
    tensor = module.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.serve
@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_predictions_match_the_in_process_executor(server, reference, tiny_tuned, scheme):
    from trt_exit.serving.client import RemoteExecutor

    images, expected = reference
    url = server.ports.grpc_url if scheme == "grpc" else server.ports.http_url
    with RemoteExecutor(url, tiny_tuned) as remote:
        got = remote.run(images)  # 48 samples: the client splits at the server's max batch 16
        single = remote.run(images[5:6])
    np.testing.assert_array_equal(got.exit_index, expected.exit_index)
    np.testing.assert_allclose(got.output, expected.output, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.confidence, expected.confidence, rtol=1e-6)
    np.testing.assert_array_equal(got.prediction, expected.prediction)
    assert single.exit_index[0] == expected.exit_index[5]
    module, client = _raw_client(server, scheme)
    reply = client.infer(MODEL, [_request(module, "image", images[:4])])
    np.testing.assert_array_equal(reply.as_numpy("prediction")[:, 0], expected.prediction[:4])
    assert [e for e in reply.as_numpy("error")[:, 0]] == [b""] * 4
    client.close()


@pytest.mark.serve
def test_concurrent_clients_are_batched_and_each_sample_takes_its_own_exit(server, reference,
                                                                           tiny_tuned):
    from trt_exit.serving.client import RemoteExecutor

    images, expected = reference
    clients, per_client = 8, 6
    answers: dict[int, tuple] = {}
    failures: list[BaseException] = []

    def client(c: int) -> None:
        try:
            with RemoteExecutor(server.ports.grpc_url, tiny_tuned) as remote:
                for i in range(c, c + per_client * clients, clients):
                    r = remote.run(images[i:i + 1])
                    answers[i] = (int(r.exit_index[0]), r.output[0])
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures and len(answers) == clients * per_client
    for i, (exit_index, output) in answers.items():
        assert exit_index == expected.exit_index[i]
        np.testing.assert_allclose(output, expected.output[i], rtol=1e-5, atol=1e-6)
    # Triton's statistics: executions per batch size; concurrent single requests were batched.
    import tritonclient.http as httpclient

    stats = httpclient.InferenceServerClient(f"127.0.0.1:{server.ports.http}") \
        .get_inference_statistics(MODEL)["model_stats"][0]["batch_stats"]
    sizes = {int(s["batch_size"]): int(s["compute_infer"]["count"]) for s in stats}
    assert max(sizes) > 1, sizes


@pytest.mark.serve
@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_bad_requests_get_their_own_error_and_the_server_keeps_serving(server, reference,
                                                                       scheme):
    images, expected = reference
    module, client = _raw_client(server, scheme)
    with pytest.raises(Exception, match="unexpected shape"):
        client.infer(MODEL, [_request(module, "image", np.zeros((2, 1, 8, 9), np.float32))])
    with pytest.raises(Exception, match="data-type is .FP64., but model .* expects .FP32."):
        client.infer(MODEL, [_request(module, "image", images[:2].astype(np.float64), "FP64")])
    # NaN values: refused in band (PyTriton cannot fail one request of a batch), neighbours fine.
    bad = images[:3].copy()
    bad[1, 0, 2, 2] = np.inf
    reply = client.infer(MODEL, [_request(module, "image", bad)])
    assert b"NaN or Inf" in reply.as_numpy("error")[0, 0]
    assert (reply.as_numpy("exit_index") == -1).all()
    reply = client.infer(MODEL, [_request(module, "image", images[:3])])
    np.testing.assert_array_equal(reply.as_numpy("exit_index")[:, 0], expected.exit_index[:3])
    client.close()


@pytest.mark.serve
def test_metrics_endpoint_counts_the_inferences(server):
    metrics = urllib.request.urlopen(server.ports.metrics_url, timeout=10).read().decode()
    line = next(l for l in metrics.splitlines()
                if l.startswith(f'nv_inference_count{{model="{MODEL}"'))
    assert float(line.split()[-1]) > 0


@pytest.mark.serve
def test_a_port_in_use_is_a_clear_error(server, tiny_tuned):
    ports = server.ports
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "trt_exit", "serve", str(tiny_tuned),
                           "--http-port", str(ports.http), "--grpc-port", str(ports.grpc + 1000),
                           "--metrics-port", str(ports.metrics + 1000)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{ports.http}" in done.stderr and "--http-port" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 30


@pytest.mark.serve
def test_sigterm_stops_the_server_cleanly(server):
    from trt_exit.serving.environment import check_port_free

    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout_s=30) == 0
    assert time.monotonic() - started < 20
    assert server.leftovers == 0  # tritonserver and its Python-backend stub are gone too
    log = server.log.read_text()
    assert "stopping: answered" in log and "Traceback" not in log
    # Its own multiprocessing helper is not "a process tritonserver left running" (it ends
    # with its parent), and with time to unload the model (--exit-timeout-s 10) nothing of
    # tritonserver's outlives it: no warning at all.
    assert "killed" not in log and "left running" not in log, log[-3000:]
    for port, option in ((server.ports.http, "--http-port"), (server.ports.grpc, "--grpc-port")):
        check_port_free("127.0.0.1", port, option)  # nothing left listening


@pytest.mark.serve
def test_a_model_that_goes_away_is_waited_for_and_reported_as_stopping(tiny_tuned, digits,
                                                                       tmp_path):
    """While Triton stops (or starts) it answers NOT_FOUND for the model it unloads (loads).
    The client tries again as for a refused connection: a model back within ``reconnect_s`` is
    answered; one that is not is reported as its server stopping, not as an unknown model."""
    import tritonclient.http as httpclient

    from trt_exit.serving.client import RemoteExecutor
    from trt_exit.serving.environment import ServingError
    from trt_exit.serving.process import ServerPorts, ServerProcess

    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_tuned), "--out", str(repo)]) == 0
    images = digits["test"].inputs["image"][:4]
    ports = ServerPorts.free()
    # The tritonserver bundled with nvidia-pytriton, as triton-repo's message says to run it
    # (its repository endpoints, unlike trt-exit serve's, are open: the test unloads the model).
    server = ServerProcess(
        [sys.executable, "-m", "trt_exit", "tritonserver", f"--model-repository={repo}",
         "--http-port",
         str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
         "--", "--model-control-mode=explicit", f"--load-model={MODEL}", "--exit-timeout-secs=3"],
        ports, MODEL, tmp_path / "tritonserver.log",
        env={**os.environ, "PYTRITON_HOME": str(tmp_path / "home")})
    with server:
        admin = httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}")
        for url in (ports.grpc_url, ports.http_url):
            with RemoteExecutor(url, tiny_tuned, reconnect_s=1.5) as remote:
                expected = remote.run(images)
                admin.unload_model(MODEL)  # as Triton does when it stops
                with pytest.raises(ServingError, match=r"stopped serving model "
                                   r"'multi_exit_vit_tiny_test' \(it was stopping or restarting"):
                    remote.run(images)
                remote.reconnect_s = 60
                load = urllib.request.Request(  # back again, from another thread
                    f"{ports.http_url}/v2/repository/models/{MODEL}/load", b"{}", method="POST")
                threading.Timer(0.5, urllib.request.urlopen, args=(load,)).start()
                got = remote.run(images)
            np.testing.assert_array_equal(got.exit_index, expected.exit_index)
            np.testing.assert_allclose(got.output, expected.output, rtol=1e-6)
        admin.close()
        assert server.stop() == 0  # Ctrl-C reaches tritonserver itself (exec)
    assert "running " in server.log.read_text().splitlines()[0]


@pytest.mark.serve
@pytest.mark.parametrize("backend", ["torch", "tensorrt"])
def test_gpu_backends_without_a_gpu_are_a_clear_error(tiny_tuned, capsys, backend):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA executor would serve")
    from trt_exit.serving.process import ServerPorts

    ports = ServerPorts.free()
    assert main(["serve", str(tiny_tuned), "--backend", backend, "--http-port", str(ports.http),
                 "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
