"""A real microphone path: a private PulseAudio daemon with a null sink, a WAV file played into
it, captured by PortAudio through ALSA's pulse plugin (``mic://pulse``, ``alsa://pulse``), as a
USB microphone would be on a Jetson; paired with camera frames by the live counter.

They need PulseAudio, the ALSA pulse plugin and PortAudio (the Jetson-like environment, see
conftest.py); elsewhere they skip with the reason.
"""

from __future__ import annotations

import json
import logging
import time
import wave

import numpy as np
import pytest

from trt_exit.pipelines.audio_features import LogMelConfig, log_mel
from trt_exit.pipelines.audio_sources import (
    SoundDeviceAudioSource,
    open_audio_source,
    wait_for_audio,
)
from trt_exit.pipelines.base import Backoff, SessionClock, SourceError
from trt_exit.pipelines.uri import parse_uri

pytestmark = pytest.mark.pulseaudio

TONE_HZ = 1000.0


def write_tone(path, seconds: float, rate: int = 16000, amplitude: float = 0.5) -> None:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (amplitude * np.sin(2 * np.pi * TONE_HZ * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(spectrum.argmax() * rate / len(samples))


def started(source) -> None:
    """Waits, as the app does, for the first audio (PulseAudio through ALSA takes 0.5-2 s)."""
    wait_for_audio(source, source._clock, 0.1, timeout_s=5.0)
    assert source._buffer.end_s is not None, "no audio within 5 s of opening"


def listen(source, seconds: float) -> None:
    """Keeps asking for windows (as the app does per frame) for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        source.window(source._clock.now_s(), 0.1)
        time.sleep(0.05)


@pytest.mark.parametrize("uri", ["mic://pulse", "alsa://pulse"])
def test_microphone_hears_the_wav_played_into_pulseaudio(pulse, tmp_path, uri):
    wav = tmp_path / "tone.wav"
    write_tone(wav, 3.0)
    with open_audio_source(uri) as source:
        source.open(SessionClock(), preferred_rate=16000)
        assert source.live and source.sample_rate == 16000  # PulseAudio takes the model's rate
        started(source)
        player = pulse.play(wav)
        try:
            time.sleep(1.5)
            window = source.window(source._clock.now_s() - 0.1, 0.5)
        finally:
            player.wait(10)
    assert window.sample_rate == 16000 and window.missing_samples < 0.05 * 16000
    heard = window.samples[window.samples != 0]
    assert len(heard) > 6000
    assert peak_hz(heard, 16000) == pytest.approx(TONE_HZ, abs=5)
    assert np.sqrt(np.mean(heard ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_sample_rate_mismatch_is_resampled_into_the_model_features(pulse, tmp_path):
    wav = tmp_path / "tone.wav"
    write_tone(wav, 3.0, rate=48000)
    config = LogMelConfig(sample_rate=16000, n_mels=32)
    with open_audio_source("mic://pulse?rate=44100") as source:
        source.open(SessionClock(), preferred_rate=config.sample_rate)
        assert source.sample_rate == 44100  # as asked, not the model's 16 kHz
        started(source)
        player = pulse.play(wav)
        try:
            time.sleep(1.8)
            window = source.window(source._clock.now_s() - 0.1, config.window_s)
        finally:
            player.wait(10)
    assert window.sample_rate == 44100 and len(window.samples) == 44100
    features = log_mel(window.samples, config, window.sample_rate)
    tone = (0.5 * np.sin(2 * np.pi * TONE_HZ * np.arange(16000) / 16000)).astype(np.float32)
    reference = log_mel(tone, config)
    assert features.shape == config.shape
    # The tone lands in the same mel band as when captured at the model's rate.
    assert features[0].mean(axis=1).argmax() == reference[0].mean(axis=1).argmax()


def test_rate_the_device_refuses_says_what_was_tried(pulse):
    with pytest.raises(SourceError, match="accepts none of the sample rates tried: 1000000 Hz"):
        open_audio_source("mic://pulse?rate=1000000").open(SessionClock(), 16000)


def test_absent_pulseaudio_server_is_a_one_line_error(pulse, monkeypatch):
    pulse.stop()
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        open_audio_source("mic://pulse").open(SessionClock(), 16000)
    message = str(info.value)
    assert "\n" not in message and "is PulseAudio running? pactl info" in message
    assert time.monotonic() - start < 10


def test_microphone_that_vanishes_gives_silence_then_comes_back(pulse, tmp_path, caplog):
    wav = tmp_path / "tone.wav"
    write_tone(wav, 6.0)
    source = SoundDeviceAudioSource(parse_uri("mic://pulse"),
                                    backoff=Backoff(initial_s=0.2, max_s=0.5, give_up_s=None))
    clock = SessionClock()
    with caplog.at_level(logging.WARNING), source:
        source.open(clock, 16000)
        started(source)
        listen(source, 0.5)
        pulse.stop()  # the device goes away mid-run
        listen(source, 2.0)
        gone = source.window(clock.now_s(), 1.0)
        assert gone.missing_samples > 0.5 * 16000  # silence, counted as missing, no exception
        assert caplog.text.count("stopped delivering audio") == 1  # warned once
        pulse.start()  # and comes back
        player = pulse.play(wav)
        try:
            deadline = time.monotonic() + 10
            while source.reopens == 0 and time.monotonic() < deadline:
                listen(source, 0.2)
            assert source.reopens == 1, "the microphone was not reopened within 10 s"
            deadline = time.monotonic() + 6  # the reopened stream starts within 0.5-2 s
            while time.monotonic() < deadline:
                listen(source, 0.2)
                back = source.window(clock.now_s() - 0.1, 0.5)
                if back.missing_samples < 0.1 * 16000:
                    break
        finally:
            player.kill()
            player.wait(10)
    assert "microphone back" in caplog.text
    assert back.missing_samples < 0.1 * 16000
    assert peak_hz(back.samples, 16000) == pytest.approx(TONE_HZ, abs=5)


@pytest.mark.gstreamer
def test_live_counter_pairs_camera_frames_with_the_microphone(gstreamer, pulse, av_model,
                                                              tmp_path):
    """The app on the CSI pipeline's software twin and a PulseAudio microphone."""
    from trt_exit.cli import main

    wav = tmp_path / "tone.wav"
    write_tone(wav, 8.0)
    out = tmp_path / "live.jsonl"
    summary = tmp_path / "summary.json"
    player = pulse.play(wav)
    try:
        code = main(["count", "csi://0?source=videotestsrc", f"jsonl://{out}", "--audio",
                     "mic://pulse", "--engines", str(av_model), "--input-width", "160",
                     "--input-height", "120", "--input-rate", "15", "--duration-s", "6",
                     "--no-status", "--summary", str(summary)])
    finally:
        player.kill()
        player.wait(10)
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) >= 30  # a 15 FPS camera for 6 s, on a busy 2-core machine
    assert [r["frame"] for r in records] == sorted(r["frame"] for r in records)
    times = [r["timestamp_s"] for r in records]
    assert all(b > a for a, b in zip(times, times[1:]))  # live: session time
    # PulseAudio's null sink starts delivering 0.5-3 s after the stream opens (a real microphone
    # at once); from then on, one second later, every frame's window is complete.
    heard = [r["timestamp_s"] for r in records if r["audio_missing_ms"] < 1000]
    assert heard, "no frame got any audio"
    settled = [r for r in records if r["timestamp_s"] > heard[0] + 1.1]
    assert len(settled) >= 5
    missing = np.array([r["audio_missing_ms"] for r in settled])
    # What is missing is the newest few blocks, not delivered yet at the frame's timestamp
    # (20 ms blocks plus PulseAudio's fragment: 15-45 ms measured), not a second of silence.
    assert np.median(missing) < 60 and np.mean(missing < 100) >= 0.8, missing.tolist()
    result = json.loads(summary.read_text())
    assert result["frames"] == len(records) and result["stop_reason"] == "duration"
