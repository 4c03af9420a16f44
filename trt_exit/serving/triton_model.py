"""The Python-backend model of a ``trt-exit triton-repo`` repository, for a stock tritonserver.

The repository's ``model.py`` imports :class:`TritonPythonModel` from here, so the model runs
the trt_exit installed next to the server. Triton calls ``initialize`` once per instance,
``execute`` with each dynamic batch of requests, and ``finalize`` on unload. The early-exit
chain runs inside this one model (Triton ensembles cannot skip a model on a data-dependent
condition): each batch goes through :func:`~trt_exit.serving.model_io.run_requests`, a
refused request gets its own error response, and the samples taken at each exit are counted in
the custom metric ``trt_exit_exit_samples_total{model, exit}`` on Triton's metrics endpoint.

Parameters (``config.pbtxt``): ``model_dir`` (relative to the version directory, or absolute),
``backend``, ``precision``, ``policy`` (``trt-exit run --policy`` spelling, empty for the tuned
thresholds) and ``threads``.
"""

from __future__ import annotations

import json
from pathlib import Path

from trt_exit.serving.model_io import exit_counts, run_requests, served_inputs

#: The custom metric (a counter per model and exit).
EXIT_METRIC = "trt_exit_exit_samples_total"


def _pb_utils():
    """Triton's ``triton_python_backend_utils``: it exists only inside the Python-backend stub,
    so it is imported when Triton calls the model, not when this module is imported."""
    try:
        import triton_python_backend_utils
    except ImportError as exc:
        from trt_exit.errors import ConfigError

        raise ConfigError("trt_exit.serving.triton_model runs inside tritonserver's Python "
                          "backend only; start the repository with tritonserver") from exc
    return triton_python_backend_utils


class TritonPythonModel:
    """One model instance: an executor and the per-exit counters."""

    def initialize(self, args: dict[str, str]) -> None:
        from trt_exit.commands.pipelines import open_executor
        from trt_exit.commands.spine import parse_policy
        from trt_exit.manifest import Manifest

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_dir = Path(params["model_dir"])
        if not model_dir.is_absolute():
            model_dir = Path(args["model_repository"]) / args["model_version"] / model_dir
        self.manifest = Manifest.load(model_dir)
        backend = params.get("backend", "onnxruntime")
        precision = params.get("precision", "fp32")
        policy = parse_policy(params.get("policy") or None, self.manifest)
        max_batch = max(1, int(config.get("max_batch_size", 1)))
        if args.get("model_instance_kind") == "GPU" and backend in ("torch", "tensorrt"):
            from trt_exit.runtime.cuda_executor import CudaExecutor

            self.executor = CudaExecutor(self.manifest, backend=backend, precision=precision,
                                         policy=policy, max_batch=max_batch,
                                         device=int(args.get("model_instance_device_id", 0)))
        else:
            self.executor = open_executor(self.manifest, backend, precision, policy,
                                          int(params.get("threads", 1)), max_batch=max_batch)
        self.input_names = [io.name for io in served_inputs(self.manifest)]
        # The family must outlive its metrics (Triton refuses to update orphaned metrics).
        pb_utils = _pb_utils()
        self.exit_family = family = pb_utils.MetricFamily(
            name=EXIT_METRIC, description="samples answered at each exit of a trt_exit model",
            kind=pb_utils.MetricFamily.COUNTER)
        self.exit_counters = [family.Metric(labels={"model": args["model_name"], "exit": str(k)})
                              for k in range(self.manifest.num_exits)]

    def execute(self, requests):
        pb_utils = _pb_utils()
        inputs = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                   for name in self.input_names} for request in requests]
        answers = run_requests(self.executor, inputs)
        responses = []
        for answer in answers:
            if isinstance(answer, dict):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in answer.items()]))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(answer))))
        for counter, samples in zip(self.exit_counters, exit_counts(answers, len(self.exit_counters))):
            if samples:
                counter.increment(samples)
        return responses

    def finalize(self) -> None:
        self.exit_counters = []  # before their family
        self.exit_family = None
        self.executor.close()
