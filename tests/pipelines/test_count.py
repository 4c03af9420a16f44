"""trt-exit count end to end on a real (tiny, trained) audiovisual model with ONNX Runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the live app needs OpenCV: pip install 'trt-exit[video]'")

from trt_exit.cli import main  # noqa: E402
from trt_exit.pipelines.base import SessionClock, SourceError, SourceLost  # noqa: E402

FIELDS = {"frame", "timestamp_s", "count", "exit", "num_exits", "confidence", "latency_ms",
          "pipeline_latency_ms", "fps", "true_count", "audio_missing_ms"}


def read_jsonl(path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must be valid JSON


def check_records(records, frames: int, num_exits: int) -> None:
    assert len(records) == frames
    assert [r["frame"] for r in records] == list(range(frames))
    for r in records:
        assert set(r) == FIELDS
        assert 0 <= r["exit"] < num_exits == r["num_exits"]
        assert r["count"] >= 0 and 0 <= r["confidence"] <= 1 and r["latency_ms"] > 0
    times = [r["timestamp_s"] for r in records]
    assert all(b > a for a, b in zip(times, times[1:]))


def test_synthetic_camera_and_microphone_300_frames(av_model, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    summary = tmp_path / "summary.json"
    code = main(["count", "synthetic://crowd", f"jsonl://{out}", "--audio", "synthetic://crowd",
                 "--engines", str(av_model), "--max-frames", "300", "--no-status",
                 "--summary", str(summary)])
    assert code == 0
    records = read_jsonl(out)
    check_records(records, 300, 3)
    assert records[45]["timestamp_s"] == pytest.approx(1.5)  # 30 FPS media time
    # The first second's windows reach back before the stream began; later ones are complete.
    assert records[0]["audio_missing_ms"] == pytest.approx(1000, abs=1)
    assert all(r["audio_missing_ms"] == 0 for r in records[30:])
    assert all(r["true_count"] is not None for r in records)
    result = json.loads(summary.read_text())
    assert result["frames"] == 300 and result["stop_reason"] == "max_frames"
    assert sum(result["exit_histogram"]) == 300 and result["dropped_frames"] == 0
    printed = capsys.readouterr().out
    assert "300 frames in" in printed and "stopped: max_frames" in printed


def write_av_files(folder, seconds: float, fps: float = 10.0):
    """A video file (OpenCV VideoWriter) and a WAV file (wave) from the synthetic scene."""
    from trt_exit.training.crowd_synth import CrowdSceneConfig, SyntheticCrowdStream

    config = CrowdSceneConfig()
    stream = SyntheticCrowdStream(5, config)
    video = folder / "crowd.mp4"
    height, width = config.image_size
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frames = int(seconds * fps)
    for i in range(frames):
        image, _ = stream.frame(i / fps)
        writer.write(image[:, :, ::-1])  # RGB -> BGR
    writer.release()
    audio = stream.audio(0.0, seconds)
    wav = folder / "crowd.wav"
    with wave.open(str(wav), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(config.sample_rate)
        handle.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return video, wav, frames


def test_video_file_and_wav_file(av_model, tmp_path):
    video, wav, frames = write_av_files(tmp_path, seconds=4.0)
    out = tmp_path / "files.jsonl"
    rendered = tmp_path / "rendered.avi"
    assert main(["count", f"file://{video}", f"jsonl://{out}", str(rendered), "--audio",
                 f"file://{wav}", "--engines", str(av_model), "--no-status"]) == 0
    records = read_jsonl(out)
    check_records(records, frames, 3)  # every frame of the file, none dropped
    assert records[25]["timestamp_s"] == pytest.approx(2.5)  # the file's 10 FPS
    assert all(r["audio_missing_ms"] == 0 for r in records[10:])
    assert all(r["true_count"] is None for r in records)
    capture = cv2.VideoCapture(str(rendered))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    capture.release()


def test_files_and_synthetic_stream_give_the_same_answers_where_the_inputs_agree(av_model, tmp_path):
    # A lossless path: the synthetic frames as PNGs (an image folder) and the scene's WAV.
    from trt_exit.training.crowd_synth import CrowdSceneConfig, SyntheticCrowdStream

    stream = SyntheticCrowdStream(5, CrowdSceneConfig())
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        image, _ = stream.frame(1.0 + i / 10)
        cv2.imwrite(str(folder / f"{i:03d}.png"), image[:, :, ::-1])
    pcm = (stream.audio(1.0, 3.0) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "a.wav"), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(pcm.tobytes())
    out = tmp_path / "folder.jsonl"
    assert main(["count", f"file://{folder}?fps=10", f"jsonl://{out}", "--audio",
                 str(tmp_path / "a.wav"), "--engines", str(av_model), "--no-status"]) == 0
    records = read_jsonl(out)
    # Reference: the executor on the same frame and the same 1 s window, built by hand.
    from trt_exit.manifest import Manifest
    from trt_exit.pipelines.audio_features import LogMelConfig, log_mel
    from trt_exit.pipelines.preprocess import image_to_input
    from trt_exit.runtime.executor import Executor

    manifest = Manifest.load(av_model)
    audio = pcm.astype(np.float32) / 32768  # what the WAV holds
    with Executor(manifest) as executor:
        for i in (10, 11):  # windows entirely inside the WAV
            image, _ = stream.frame(1.0 + i / 10)
            end = int(round(i / 10 * 16000))
            feeds = {"image": image_to_input(image, manifest.preprocessing["image"])[None],
                     "audio": log_mel(audio[end - 16000:end],
                                      LogMelConfig.from_dict(manifest.preprocessing["audio"]),
                                      16000)[None]}
            expected = executor.run(feeds)
            assert records[i]["exit"] == int(expected.exit_index[0])
            assert records[i]["count"] == pytest.approx(float(expected.output[0, 0]), abs=1e-4)


def test_stop_event_stops_cleanly_and_joins_threads(av_model, tmp_path):
    from trt_exit.commands.pipelines import open_executor
    from trt_exit.manifest import Manifest
    from trt_exit.pipelines.audio_sources import open_audio_source
    from trt_exit.pipelines.crowd_count import CountConfig, CrowdCounter
    from trt_exit.pipelines.sinks import open_sink
    from trt_exit.pipelines.video_sources import open_video_source

    before = threading.active_count()
    manifest = Manifest.load(av_model)
    stop = threading.Event()
    seen = []

    def on_result(result):
        seen.append(result.frame)
        if len(seen) == 7:
            stop.set()

    out = tmp_path / "stopped.jsonl"
    with open_executor(manifest, "onnxruntime", "fp32") as executor:
        with CrowdCounter(manifest, executor, open_video_source("synthetic://crowd"),
                          open_audio_source("synthetic://crowd"), [open_sink(f"jsonl://{out}")],
                          CountConfig(), stop_event=stop, on_result=on_result) as app:
            summary = app.run()
    assert summary.stop_reason == "interrupted" and summary.frames == 7
    assert len(read_jsonl(out)) == 7
    assert threading.active_count() == before


def test_ctrl_c_prints_the_summary_and_loses_no_line(av_model, tmp_path):
    # The command turns SIGINT into a stop request (checked between frames): a
    # KeyboardInterrupt raised inside a queue's lock could hang the capture thread's join.
    out = tmp_path / "live.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "trt_exit", "count", "synthetic://crowd?fps=20",
         f"jsonl://{out}", "--audio", "synthetic://crowd", "--engines", str(av_model),
         "--realtime"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 10:
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped: interrupted" in stdout
    records = read_jsonl(out)
    frames = int(stdout.split(" frames in")[0].split()[-1])
    assert len(records) == frames >= 10
    # --realtime: frames come at 20 FPS of media time, so the run is live-paced.
    assert records[-1]["timestamp_s"] == pytest.approx(records[-1]["frame"] / 20, abs=0.5)


def test_sigterm_stops_cleanly(av_model, tmp_path, capsys, caplog):
    # In-process: the command installs a SIGTERM handler for the run (docker stop) and puts the
    # previous one back afterwards; a thread sends the real signal once lines are written.
    out = tmp_path / "term.jsonl"

    def terminate_when_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    killer = threading.Thread(target=terminate_when_running)
    killer.start()
    try:
        code = main(["count", "synthetic://crowd", f"jsonl://{out}", "--audio", "none://",
                     "--engines", str(av_model), "--realtime", "--no-status"])
    finally:
        killer.join()
    assert code == 0
    assert "stopped: interrupted" in capsys.readouterr().out
    assert "hears silence" in caplog.text  # the video-only run says so
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is before_int
    read_jsonl(out)


class UnpluggedCamera:
    """A live camera that delivers ``frames`` frames, then is gone for good."""

    live = True

    def __init__(self, frames: int):
        from trt_exit.pipelines.uri import parse_uri

        self.uri = parse_uri("v4l2:///dev/video7")
        self.fps = 30.0
        self.frames = frames
        self.delivered = 0

    def open(self, clock: SessionClock):
        if self.delivered:
            raise SourceError("no camera at /dev/video7")
        self.clock = clock

    def read(self):
        from trt_exit.pipelines.base import Frame

        if self.delivered >= self.frames:
            raise SourceLost("v4l2:///dev/video7: the camera stopped delivering frames")
        self.delivered += 1
        time.sleep(0.005)
        return Frame(np.zeros((96, 128, 3), np.uint8), self.clock.now_s(), self.delivered - 1)

    def reopen(self):
        self.close()
        self.open(self.clock)

    def close(self):
        pass


def test_camera_lost_mid_run_keeps_the_results_and_says_what_to_do(av_model, tmp_path):
    from trt_exit.commands.pipelines import open_executor
    from trt_exit.manifest import Manifest
    from trt_exit.pipelines.audio_sources import open_audio_source
    from trt_exit.pipelines.crowd_count import CountConfig, CrowdCounter
    from trt_exit.pipelines.sinks import open_sink

    manifest = Manifest.load(av_model)
    out = tmp_path / "lost.jsonl"
    with open_executor(manifest, "onnxruntime", "fp32") as executor:
        app = CrowdCounter(manifest, executor, UnpluggedCamera(frames=15),
                           open_audio_source("synthetic://crowd"), [open_sink(f"jsonl://{out}")],
                           CountConfig(reconnect_s=0.3, queue_frames=64))
        with app, pytest.raises(SourceLost, match="not back after") as info:
            app.run()
    summary = info.value.summary
    assert summary.stop_reason == "source_lost" and summary.frames == 15
    assert len(read_jsonl(out)) == 15  # the file is closed and complete


@pytest.mark.parametrize("args, message", [
    (["synthetic://crowd", "--engines", "{av}"], "--audio"),
    (["{tmp}/missing.mp4", "--audio", "none://", "--engines", "{av}"], "no such video file"),
    (["synthetic://crowd", "--audio", "mic.mp3", "--engines", "{av}"], "must be WAV"),
    (["synthetic://crowd", "ftp://x", "--audio", "none://", "--engines", "{av}"], "unknown URI"),
    (["synthetic://crowd", "--audio", "none://", "--engines", "{tmp}"], "no manifest"),
    (["synthetic://crowd", "--audio", "none://", "--engines", "{digits}"], "no image preprocessing"),
])
def test_bad_input_is_one_line_with_what_to_do(av_model, tiny_export, tmp_path, capsys, args,
                                               message):
    args = [a.format(av=av_model, tmp=tmp_path, digits=tiny_export) for a in args]
    assert main(["count", *args, "--max-frames", "3", "--no-status"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_deadline_mode_uses_the_latency_profile(av_model, tmp_path):
    out = tmp_path / "deadline.jsonl"
    # A budget below the first segment: every frame takes the first exit, whatever it says.
    assert main(["count", "synthetic://crowd", f"jsonl://{out}", "--audio", "synthetic://crowd",
                 "--engines", str(av_model), "--max-frames", "20", "--budget-ms", "0.001",
                 "--no-status"]) == 0
    assert {r["exit"] for r in read_jsonl(out)} == {0}


def test_short_soak_shows_no_growth(av_model, tmp_path):
    from trt_exit.pipelines.soak import SoakLimits, soak

    result = soak(av_model, frames=800, jsonl=tmp_path / "soak.jsonl", sample_every=40,
                  limits=SoakLimits(warmup_fraction=0.25, max_rss_growth_mb=12.0,
                                    max_rss_slope_kb_per_1k_frames=4096))
    assert result.frames == 800
    assert result.passed, result.reasons
    assert len(set(result.os_threads[len(result.os_threads) // 4:])) == 1


def test_gpu_backend_without_a_gpu_points_to_onnxruntime(av_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["count", "synthetic://crowd", "--audio", "none://", "--engines", str(av_model),
                 "--backend", "torch", "--max-frames", "2", "--no-status"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU" in err and "--backend onnxruntime" in err


def test_duration_limit_stops_a_realtime_run_on_time(av_model, tmp_path):
    summary = tmp_path / "summary.json"
    assert main(["count", "synthetic://crowd?fps=20", "--audio", "synthetic://crowd",
                 "--engines", str(av_model), "--realtime", "--duration-s", "1.5", "--no-status",
                 "--summary", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["stop_reason"] == "duration"
    assert 1.5 <= result["duration_s"] < 3.0
    assert result["frames"] <= 20 * result["duration_s"] + 2  # paced, never ahead of the clock


def test_ctrl_c_during_start_up_still_ends_with_a_summary(av_model, tmp_path):
    out = tmp_path / "early.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "trt_exit", "count", "synthetic://crowd?fps=20",
         f"jsonl://{out}", "--audio", "synthetic://crowd", "--engines", str(av_model),
         "--realtime"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # the signal handlers are in place once it logs
        while time.monotonic() < deadline and not out.exists():
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped: interrupted" in stdout
    assert len(read_jsonl(out)) == int(stdout.split(" frames in")[0].split()[-1])
