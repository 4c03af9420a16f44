"""Experiments that reproduce the comparisons of the papers this project implements.

* :mod:`trt_exit.experiments.exit_families`: exit families x exit positions on an image
  classification dataset (digits), CopycatSL-ViT against SL-ViT, SL-ViT on a CNN backbone;
* :mod:`trt_exit.experiments.av_crowd`: audiovisual crowd counting with exits that fuse audio
  and vision.

``trt-exit experiment`` runs them; each writes ``results.json`` and plots into one directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

RESULTS_NAME = "results.json"


def finish_results(results: dict[str, Any], out_dir: Path, began: float,
                   write_plots: Callable[[dict[str, Any], Path], list[Path]],
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Adds the machine, torch threads and wall time to ``results``, writes the plots, then
    ``results.json`` (atomically, last: a results file means the run finished)."""
    import torch

    from trt_exit.fileio import atomic_write_json
    from trt_exit.profiling.environment import machine_info

    results["machine"] = machine_info()
    results["torch_threads"] = torch.get_num_threads()
    results["seconds"] = time.perf_counter() - began
    plots = write_plots(results, out_dir)
    results["plots"] = [p.name for p in plots]
    atomic_write_json(out_dir / RESULTS_NAME, results)
    say(f"wrote {out_dir / RESULTS_NAME} and {', '.join(p.name for p in plots)} "
        f"in {results['seconds']:.0f} s")
    return results
