"""An audio classifier (ViT over log-mel patches) trained briefly, exported per stage, and run
by the host executor on ONNX Runtime with tuned thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_exit import tensor_names as tn
from trt_exit.training.trainer import TrainConfig


@pytest.fixture(scope="module")
def audio_splits():
    from trt_exit.training.datasets import load_dataset

    return load_dataset("synthetic_audio", seed=0, per_class=(40, 10, 10))


@pytest.fixture(scope="module")
def audio_model(audio_splits):
    from trt_exit.models import create_model
    from trt_exit.training.trainer import seed_everything, train

    seed_everything(0)
    model = create_model("multi_exit_audio_vit_tiny_test")
    train(model, audio_splits["train"],
          TrainConfig(epochs=15, lr=3e-3, batch_size=32, warmup_epochs=1, num_threads=1),
          progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def audio_export(audio_model, audio_splits, tmp_path_factory):
    from trt_exit.workflow import export_step, tune_step

    out = tmp_path_factory.mktemp("audio_export")
    manifest = export_step(audio_model, out, audio_splits,
                           {"name": "synthetic_audio", "seed": 0,
                            "options": {"per_class": [40, 10, 10]}})
    return tune_step(manifest, audio_splits["val"], max_loss=0.05, profile_repeats=10)


def test_it_learns_the_generated_classes(audio_model, audio_splits):
    from trt_exit.training.trainer import evaluate

    accuracy = evaluate(audio_model, audio_splits["test"])
    assert accuracy[-1] > 0.4, f"chance is 1/6; measured ~0.65 after 15 epochs, got {accuracy}"


def test_manifest_has_one_audio_input(audio_export):
    assert [(t.name, t.shape) for t in audio_export.inputs] == [(tn.AUDIO, [-1, 1, 32, 64])]
    assert audio_export.stages[0].input_names() == [tn.AUDIO]
    assert set(audio_export.preprocessing) == {"audio"}
    assert audio_export.parity["fp32"]["ok"]
    assert audio_export.model["class_names"][0] == "low_tone"


def test_executor_matches_torch_and_takes_early_exits(audio_export, audio_model, audio_splits):
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    test = audio_splits["test"]
    with torch.no_grad():
        reference = [o.numpy() for o in audio_model(torch.from_numpy(test.inputs[tn.AUDIO]))]
    with Executor(audio_export) as executor:
        everything = executor.run(test.inputs[tn.AUDIO], AllExitsPolicy())
        tuned = executor.run(test.inputs[tn.AUDIO])
        full = executor.run_full_model(test.inputs[tn.AUDIO])
    for k, ref in enumerate(reference):
        assert np.abs(everything.all_outputs[k] - ref).max() < 1e-4
    assert np.abs(full.output - reference[-1]).max() < 1e-4
    for i, k in enumerate(tuned.exit_index):
        assert np.allclose(tuned.output[i], everything.all_outputs[k, i], atol=1e-5)
