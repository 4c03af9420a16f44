"""The audio ring buffer, frame/audio pairing, WAV and synthetic sources, microphones."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from trt_exit.errors import ConfigError, MissingDependencyError
from trt_exit.pipelines.audio_features import LogMelConfig, log_mel
from trt_exit.pipelines.audio_sources import (
    AudioRingBuffer,
    SoundDeviceAudioSource,
    import_sounddevice,
    open_audio_source,
)
from trt_exit.pipelines.base import SessionClock, SourceError
from trt_exit.pipelines.uri import parse_uri

RATE = 1000  # a small rate keeps the sample arithmetic readable


def ramp(start: int, n: int) -> np.ndarray:
    """Sample i of the stream has the value i (so a window shows which samples it holds)."""
    return np.arange(start, start + n, dtype=np.float32)


def test_window_ends_at_the_timestamp():
    buffer = AudioRingBuffer(RATE, capacity_s=2.0)
    for block in range(10):  # 100 ms blocks, stream starts at session time 5.0 s
        buffer.write(ramp(100 * block, 100), 5.0 + 0.1 * block)
    window = buffer.window(end_s=5.75, duration_s=0.5)
    np.testing.assert_array_equal(window.samples, ramp(250, 500))
    assert window.missing_samples == 0


def test_window_before_the_stream_and_not_yet_arrived_is_zero_and_counted():
    buffer = AudioRingBuffer(RATE, capacity_s=2.0)
    buffer.write(ramp(0, 300), 1.0)  # covers [1.0, 1.3)
    early = buffer.window(end_s=1.1, duration_s=0.5)  # [0.6, 1.1): 400 ms before the start
    np.testing.assert_array_equal(early.samples[:400], 0)
    np.testing.assert_array_equal(early.samples[400:], ramp(0, 100))
    assert early.missing_samples == 400
    late = buffer.window(end_s=1.4, duration_s=0.2)  # [1.2, 1.4): the last 100 ms not here yet
    np.testing.assert_array_equal(late.samples[:100], ramp(200, 100))
    assert late.missing_samples == 100


def test_dropout_is_zero_filled_and_keeps_later_samples_on_time():
    buffer = AudioRingBuffer(RATE, capacity_s=2.0, tolerance_s=0.02)
    buffer.write(ramp(0, 100), 0.0)
    buffer.write(ramp(1000, 100), 0.3)  # 200 ms lost between the blocks
    assert buffer.gap_samples == 200
    window = buffer.window(end_s=0.4, duration_s=0.4)
    np.testing.assert_array_equal(window.samples[:100], ramp(0, 100))
    np.testing.assert_array_equal(window.samples[100:300], 0)
    np.testing.assert_array_equal(window.samples[300:], ramp(1000, 100))


def test_small_jitter_is_ignored_and_a_fast_audio_clock_reanchors():
    buffer = AudioRingBuffer(RATE, capacity_s=2.0, tolerance_s=0.02)
    buffer.write(ramp(0, 100), 0.0)
    buffer.write(ramp(100, 100), 0.105)  # 5 ms late: jitter, the sample clock wins
    assert buffer.end_s == pytest.approx(0.2)
    buffer.write(ramp(200, 100), 0.15)  # 50 ms early: the origin moves back
    assert buffer.end_s == pytest.approx(0.25)
    np.testing.assert_array_equal(buffer.window(0.25, 0.1).samples, ramp(200, 100))


def test_wraparound_keeps_the_last_capacity_seconds():
    buffer = AudioRingBuffer(RATE, capacity_s=1.0)
    for block in range(37):
        buffer.write(ramp(70 * block, 70), 0.07 * block)
    end = 37 * 70
    np.testing.assert_array_equal(buffer.window(end / RATE, 1.0).samples, ramp(end - 1000, 1000))
    old = buffer.window(end / RATE - 0.5, 1.0)  # half of it fell out of the buffer
    assert old.missing_samples == 500


def test_ring_buffer_is_thread_safe_under_a_writer_thread():
    import threading

    buffer = AudioRingBuffer(RATE, capacity_s=1.0)
    stop = threading.Event()

    def writer():
        block = 0
        while not stop.is_set() and block < 2000:
            buffer.write(ramp(10 * block, 10), 0.01 * block)
            block += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(200):
            end = buffer.end_s
            if end is None or end < 0.3:
                continue
            window = buffer.window(end, 0.3)
            filled = window.samples[window.samples != 0]
            # Whatever was read is a contiguous run of the ramp: no torn writes.
            assert np.all(np.diff(filled) == 1)
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------- sources


def write_wav(path, samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> None:
    pcm = np.clip(samples, -1, 1)
    pcm = np.repeat(pcm[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(width)
        handle.setframerate(rate)
        if width == 2:
            handle.writeframes((pcm * 32767).astype("<i2").tobytes())
        else:
            handle.writeframes((pcm * (2 ** 31 - 1)).astype("<i4").tobytes())


@pytest.mark.parametrize("channels, width", [(1, 2), (2, 2), (1, 4)])
def test_wav_window_matches_the_file(tmp_path, channels, width):
    rate = 44100
    t = np.arange(3 * rate) / rate
    signal = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / "clip.wav"
    write_wav(path, signal, rate, channels, width)
    with open_audio_source(f"file://{path}") as source:
        source.open(SessionClock(), preferred_rate=16000)
        assert source.sample_rate == rate
        window = source.window(end_s=2.0, duration_s=1.0)
    np.testing.assert_allclose(window.samples, signal[rate:2 * rate], atol=1e-4)
    assert window.missing_samples == 0


def test_wav_at_another_rate_is_resampled_into_the_model_features(tmp_path):
    rate = 48000
    t = np.arange(2 * rate) / rate
    signal = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    path = tmp_path / "clip48k.wav"
    write_wav(path, signal, rate)
    config = LogMelConfig(sample_rate=16000, n_mels=32)
    with open_audio_source(str(path)) as source:
        source.open(SessionClock(), preferred_rate=16000)
        window = source.window(2.0, config.window_s)
    features = log_mel(window.samples, config, window.sample_rate)
    tone_16k = (0.3 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)).astype(np.float32)
    reference = log_mel(tone_16k, config)
    assert features.shape == config.shape
    # The 1 kHz tone lands in the same mel band whichever rate it was captured at.
    assert features[0].mean(axis=1).argmax() == reference[0].mean(axis=1).argmax()


def test_wav_end_gives_silence_not_an_error(tmp_path):
    path = tmp_path / "short.wav"
    write_wav(path, np.full(8000, 0.25, np.float32), 16000)
    with open_audio_source(str(path)) as source:
        source.open(SessionClock(), 16000)
        window = source.window(end_s=1.0, duration_s=1.0)
    assert window.missing_samples == 8000
    assert window.samples[:8000] == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEjunk", b"not audio at all" * 50])
def test_corrupt_wav_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(SourceError, match="WAV"):
        open_audio_source(str(path)).open(SessionClock(), 16000)


def test_audio_file_must_exist_and_be_wav(tmp_path):
    with pytest.raises(SourceError, match="no such audio file"):
        open_audio_source(str(tmp_path / "missing.wav")).open(SessionClock(), 16000)
    with pytest.raises(ConfigError, match="WAV"):
        open_audio_source("file://clip.mp3")
    with pytest.raises(ConfigError, match="not an audio source"):
        open_audio_source("csi://0")


def test_synthetic_audio_window_is_the_scene_sound_ending_at_the_frame():
    from trt_exit.training.crowd_synth import CrowdSceneConfig, SyntheticCrowdStream

    with open_audio_source("synthetic://crowd?seed=4") as source:
        source.open(SessionClock(), 16000)
        windows = [source.window(t, 1.0) for t in (0.5, 1.0, 1.0333, 2.5)]
    stream = SyntheticCrowdStream(4, CrowdSceneConfig())
    np.testing.assert_allclose(windows[1].samples, stream.audio(0.0, 1.0), atol=1e-6)
    np.testing.assert_allclose(windows[3].samples, stream.audio(1.5, 2.5), atol=1e-6)
    assert windows[0].missing_samples == 8000  # the first half second precedes the stream
    assert windows[2].samples[-1] == pytest.approx(stream.audio(1.0333 - 1 / 16000, 1.0333)[-1],
                                                   abs=1e-6)


def test_none_source_is_silence():
    with open_audio_source("none://") as source:
        source.open(SessionClock(), 22050)
        window = source.window(3.0, 1.0)
    assert source.sample_rate == 22050 and not window.samples.any()


def test_microphone_needs_portaudio_or_says_how_to_get_it():
    try:
        import_sounddevice()
    except (SourceError, MissingDependencyError) as exc:
        assert "libportaudio2" in str(exc) or "trt-exit[audio]" in str(exc)
        pytest.skip(f"no PortAudio here, so no microphone test ({type(exc).__name__})")
    source = SoundDeviceAudioSource(parse_uri("mic://default"))
    try:
        source.open(SessionClock(), 16000)
    except SourceError as exc:
        pytest.skip(f"PortAudio is installed but there is no usable microphone: {exc}")
    with source:
        import time

        time.sleep(0.5)
        window = source.window(source._clock.now_s(), 0.2)
    assert window.samples.shape == (int(0.2 * source.sample_rate),)
