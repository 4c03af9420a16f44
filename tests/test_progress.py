"""Item 18 of issue 20: progress bars written to a file or a pipe filled CI logs with thousands
of carriage-return lines (nested tqdm bars during training). Bars on a terminal; off one, a line
per epoch (or per engine) and nothing for the inner loops."""

from __future__ import annotations

import io

from trt_exit.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_an_outer_loop_writes_a_line_per_step():
    stream = io.StringIO()
    bar = progress_bar(range(2, 5), desc="train end_to_end", unit="epoch", lines=True,
                       stream=stream)
    for epoch in bar:
        inner = progress_bar(desc="epoch", total=100, unit="img", stream=stream)
        for _ in range(10):
            inner.update(10)
        inner.close()
        bar.set_postfix({"loss": f"{1 / (epoch + 1):.3f}"})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(" (")[0] for line in lines] == [
        "train end_to_end: epoch 3/5, loss 0.333", "train end_to_end: epoch 4/5, loss 0.250",
        "train end_to_end: epoch 5/5, loss 0.200"]


def test_disabled_is_silent_everywhere():
    for stream in (io.StringIO(), Terminal()):
        for _ in progress_bar(range(3), desc="x", enabled=False, lines=True, stream=stream):
            pass
        assert stream.getvalue() == ""


def test_on_a_terminal_it_is_tqdm():
    stream = Terminal()
    for _ in progress_bar(range(3), desc="train", unit="epoch", lines=True, stream=stream):
        pass
    assert "\r" in stream.getvalue()  # tqdm redraws in place


def test_training_into_a_log_writes_one_line_per_epoch(digits, capsys):
    from trt_exit.models import create_model
    from trt_exit.training.trainer import TrainConfig, train

    model = create_model("multi_exit_vit_tiny_test")
    config = TrainConfig(epochs=3, lr=1e-2, warmup_epochs=0, batch_size=256, seed=0)
    train(model, digits["train"], config, val_set=digits["val"], progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 3, err
    assert lines[-1].startswith("train end_to_end: epoch 3/3, loss ") and " val " in lines[-1]


def test_the_trt_exit_train_command_into_a_pipe(tmp_path, capsys):
    from trt_exit.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), "--model", "multi_exit_vit_tiny_test",
                 "--epochs", "2", "--batch-size", "256"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(",")[0] for line in err.splitlines()] == [
        "train end_to_end: epoch 1/2", "train end_to_end: epoch 2/2"]
