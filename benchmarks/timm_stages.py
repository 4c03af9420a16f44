"""Exported stages of timm backbones with exits: ONNX-vs-PyTorch parity and per-stage latency.

For DeiT-tiny and ResNet-18 at 224x224 (random weights: parity and latency do not depend on
them), attaches two early exits, exports one ONNX graph per stage, and measures each stage's
median latency with ONNX Runtime on the CPU (batch 1, 1 intra-op thread), plus the no-exit
baseline graph. Writes JSON and prints a table.

    python benchmarks/timm_stages.py --out benchmarks/results/timm-stages-cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: model, creation arguments, exit positions (units), exit families
MODELS = [
    ("deit_tiny_patch16_224", {}, [4, 8], ["slvit", "slvit"]),
    ("resnet18", {}, [4, 6], ["slvit_cnn", "cnn_ignore"]),
]


def measure(name, kwargs, blocks, families, repeats, workdir):
    from trt_exit.export.onnx_export import export_model
    from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint
    from trt_exit.models.timm_adapter import attach_exits, create_timm_model
    from trt_exit.profiling.timers import measure_stage_latency
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    torch.manual_seed(0)
    timm_model = create_timm_model(name, **kwargs).eval()
    model = attach_exits(timm_model, blocks, families, input_size=(3, 224, 224)).eval()
    # through a checkpoint, as trt-exit export does: parity is then also checked against the
    # trained (here: original) model's saved outputs
    model = load_checkpoint(save_checkpoint(model, workdir / f"{name}.safetensors"))
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    began = time.perf_counter()
    manifest = export_model(model, workdir / name, sample_inputs={"image": x})
    export_s = time.perf_counter() - began
    parity = manifest.parity["fp32"]
    with Executor(manifest, policy=AllExitsPolicy()) as executor:
        stage_ms = measure_stage_latency(executor, {"image": x[:1]}, repeats=repeats)
        full = []
        for _ in range(repeats):
            full.append(executor.run_full_model({"image": x[:1]}).latency_ms)
        results = executor.run(x)
    with torch.no_grad():
        reference = timm_model(torch.from_numpy(x)).numpy()
    per_stage = {}
    for record in parity["stages"]:
        per_stage[record["stage"]] = max(v["max_abs_diff"] for v in record["tensors"].values())
    return {
        "model": name, "exits": dict(zip(map(str, blocks), families)),
        "units": len(model.backbone.blocks),
        "parity_max_abs_diff_exit_outputs": parity["max_output_diff"],
        "parity_max_abs_diff_per_stage": per_stage,
        "parity_vs_saved_model": parity["trained_model"]["max_output_diff"],
        "final_exit_vs_timm_chained_onnx": float(np.abs(results.all_outputs[-1] - reference).max()),
        "stage_latency_ms": stage_ms,
        "full_graph_latency_ms": float(np.median(full)),
        "export_seconds": export_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per stage")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from trt_exit.profiling.environment import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, k, b, f, args.repeats, Path(tmp)) for n, k, b, f in MODELS]
    result = {"batch": 1, "threads": 1, "backend": "onnxruntime (CPU)", "statistic":
              f"median of {args.repeats}", "weights": "random (timm init, seed 0)",
              "machine": machine_info(), "models": rows}
    for row in rows:
        print(f"\n{row['model']} ({row['units']} units, exits {row['exits']}): parity max |ONNX - "
              f"PyTorch| {row['parity_max_abs_diff_exit_outputs']:.2e} on exit outputs, "
              f"{row['parity_vs_saved_model']:.2e} vs the saved model, chained final exit vs "
              f"timm {row['final_exit_vs_timm_chained_onnx']:.2e}")
        print(f"  {'stage':<10} {'median ms':>10} {'parity':>10}")
        for stage, ms in row["stage_latency_ms"].items():
            diff = row["parity_max_abs_diff_per_stage"].get(stage, 0)
            print(f"  {stage:<10} {ms:10.3f} {diff:10.2e}")
        print(f"  {'sum':<10} {sum(row['stage_latency_ms'].values()):10.3f}")
        print(f"  {'full graph':<10} {row['full_graph_latency_ms']:10.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
