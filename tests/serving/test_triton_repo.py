"""trt-exit triton-repo: the repository's files, and a stock tritonserver (the binary bundled with
nvidia-pytriton) serving it on 127.0.0.1."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest

from trt_exit.cli import main
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import Executor

MODEL = "multi_exit_vit_tiny_test"


def test_repository_layout_and_config(tiny_tuned, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_tuned), "--out", str(repo), "--max-batch", "8",
                 "--max-queue-delay-us", "500", "--policy", "fixed:1"]) == 0
    assert "tritonserver --model-repository=" in capsys.readouterr().out
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 8" in config
    assert re.search(r'name: "image"\s+data_type: TYPE_FP32\s+dims: \[ 1, 8, 8 \]', config)
    assert re.search(r'name: "prediction"\s+data_type: TYPE_INT64\s+dims: \[ 1 \]', config)
    assert "max_queue_delay_microseconds: 500" in config and "kind: KIND_CPU" in config
    assert 'value: { string_value: "fixed:1" }' in config
    assert "trt_exit.serving.triton_model" in (repo / MODEL / "1" / "model.py").read_text()
    assert "tritonserver --model-repository" in (repo / "README.md").read_text()
    copied = Manifest.load(repo / MODEL / "1" / "model", verify=True)
    assert [s.name for s in copied.stages] == [s.name for s in Manifest.load(tiny_tuned).stages]


def test_reference_mode_points_at_the_model_and_gpu_backends_get_gpu_instances(tiny_tuned,
                                                                                tmp_path):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_tuned), "--out", str(repo), "--reference",
                 "--backend", "torch", "--model-name", "digits"]) == 0
    config = (repo / "digits" / "config.pbtxt").read_text()
    assert f'string_value: "{tiny_tuned.resolve()}"' in config and "KIND_GPU" in config
    assert not (repo / "digits" / "1" / "model").exists()


def test_refusals_leave_nothing_behind(tiny_tuned, tmp_path, fresh_copy, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert main(["triton-repo", str(tiny_tuned), "--out", str(repo)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["triton-repo", str(tiny_tuned), "--out", str(tmp_path / "r2"), "--backend",
                 "tensorrt", "--instance-kind", "cpu"]) == 2
    assert "--instance-kind gpu" in capsys.readouterr().err
    damaged = fresh_copy(tiny_tuned)
    onnx = damaged / Manifest.load(damaged).stages[1].onnx["fp32"].path
    onnx.write_bytes(onnx.read_bytes()[:-10])
    assert main(["triton-repo", str(damaged), "--out", str(tmp_path / "r3")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["triton-repo", str(tiny_tuned), "--out", str(tmp_path / "missing" / "r4")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err  # no silent mkdir
    assert main(["triton-repo", str(tiny_tuned), "--out", "/proc/r5"]) == 2
    assert "cannot write in /proc" in capsys.readouterr().err  # found before any copying
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "repo"]  # no partial repo


@pytest.mark.serve
def test_stock_tritonserver_serves_the_exported_repository(tiny_tuned, digits, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from trt_exit.serving.client import RemoteExecutor
    from trt_exit.serving.process import ServerPorts, ServerProcess

    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_tuned), "--out", str(repo)]) == 0
    images = digits["test"].inputs["image"][:40]
    with Executor(tiny_tuned) as executor:
        reference = executor.run(images)
    ports = ServerPorts.free()
    with ServerProcess.tritonserver(repo, ports, MODEL, tmp_path / "tritonserver.log",
                                    tmp_path / "work") as server:
        for url in (ports.grpc_url, ports.http_url):
            with RemoteExecutor(url, tiny_tuned) as remote:
                got = remote.run(images)
            np.testing.assert_array_equal(got.exit_index, reference.exit_index)
            np.testing.assert_allclose(got.output, reference.output, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.confidence, reference.confidence, rtol=1e-6)
        # A request with NaN gets its own error response; the server keeps serving.
        bad = images[:2].copy()
        bad[0, 0, 0, 0] = np.nan
        for module, address in ((httpclient, f"127.0.0.1:{ports.http}"),
                                (grpcclient, f"127.0.0.1:{ports.grpc}")):
            client = module.InferenceServerClient(address)
            tensor = module.InferInput("image", list(bad.shape), "FP32")
            tensor.set_data_from_numpy(bad)
            with pytest.raises(Exception, match="NaN or Inf"):
                client.infer(MODEL, [tensor])
            tensor = module.InferInput("image", [2, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(images[:2])
            reply = client.infer(MODEL, [tensor])
            np.testing.assert_array_equal(reply.as_numpy("exit_index")[:, 0],
                                          reference.exit_index[:2])
            client.close()
        metrics = urllib.request.urlopen(ports.metrics_url, timeout=10).read().decode()
        assert server.process.poll() is None
    counts = {int(k): float(v) for k, v in re.findall(
        r'trt_exit_exit_samples_total\{exit="(\d+)",model="%s"\} (\S+)' % MODEL, metrics)}
    expected = 2 * np.bincount(reference.exit_index, minlength=3) + 2 * np.bincount(
        reference.exit_index[:2], minlength=3)
    assert [counts.get(k, 0) for k in range(3)] == expected.tolist()
    # Triton's own counter: every sample the model was given, the refused NaN requests too
    # (2 x 40 + 2 x 2 answered + 2 x 2 refused); the exit counters count answered samples.
    served = re.search(r'nv_inference_count\{model="%s",version="1"\} (\d+)' % MODEL, metrics)
    assert served and int(served.group(1)) == 88, metrics


def test_onnxruntime_model_holds_the_single_graph(tiny_tuned, tmp_path):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_tuned), "--out", str(repo), "--onnxruntime-model"]) == 0
    model = repo / f"{MODEL}_onnx"
    manifest = Manifest.load(tiny_tuned)
    graph = model / "1" / "model.onnx"
    assert graph.read_bytes() == manifest.early_exit_graph_path("fp32").read_bytes()
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "dynamic_batching" in config
    assert f'name: "{MODEL}_onnx"' in config and "kind: KIND_CPU" in config
    assert (repo / MODEL / "config.pbtxt").is_file()  # the Python-backend model beside it
    assert f"`{MODEL}_onnx`" in (repo / "README.md").read_text()


@pytest.mark.serve
def test_onnxruntime_model_config_is_a_triton_model_config_of_its_graph(tiny_tuned, tmp_path):
    """What can be checked without Triton's onnxruntime backend (PyTriton's tritonserver has the
    Python backend only): the config parses as Triton's ModelConfig protobuf, and its tensors
    are the graph's as ONNX Runtime reports them (names, dtypes, per-sample dims; a (B,) output
    is dims [1] reshaped to [], Triton's convention), with a dynamic batch on every one."""
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_tuned), "--out", str(repo), "--onnxruntime-model",
                 "--max-batch", "16", "--instances", "2", "--max-queue-delay-us", "200"]) == 0
    model = repo / f"{MODEL}_onnx"
    config = text_format.Parse((model / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (f"{MODEL}_onnx",
                                                                    "onnxruntime", 16)
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    session = ort.InferenceSession(str(model / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    types = {"tensor(float)": mc.TYPE_FP32, "tensor(int64)": mc.TYPE_INT64}
    for declared, actual in ((config.input, session.get_inputs()),
                             (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for tensor, value in zip(declared, actual):
            assert tensor.data_type == types[value.type]
            assert isinstance(value.shape[0], str)  # dynamic batch
            per_sample = list(value.shape[1:])
            if per_sample:
                assert list(tensor.dims) == per_sample and not tensor.HasField("reshape")
            else:
                assert list(tensor.dims) == [1] and list(tensor.reshape.shape) == []
    # the thresholds input has its default: not a request input
    assert [i.name for i in session.get_overridable_initializers()] == ["thresholds"]
