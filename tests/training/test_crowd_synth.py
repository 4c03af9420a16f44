"""The synthetic crowd scenes and the never-ending stream (contract used by the live pipeline)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from trt_exit.errors import ConfigError
from trt_exit.training.crowd_synth import (
    DEGRADATIONS,
    CrowdSceneConfig,
    SyntheticCrowdStream,
    render_scene,
)

CONFIG = CrowdSceneConfig()


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


@pytest.mark.parametrize("degradation", [None, *DEGRADATIONS])
def test_render_scene_shapes_and_ranges(degradation):
    image, audio = render_scene(12, np.random.default_rng(0), CONFIG, degradation)
    assert image.shape == (*CONFIG.image_size, 3) and image.dtype == np.uint8
    assert audio.shape == (16000,) and audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.0


def test_render_scene_is_seeded():
    a = render_scene(20, np.random.default_rng(7), CONFIG, "blur")
    b = render_scene(20, np.random.default_rng(7), CONFIG, "blur")
    c = render_scene(20, np.random.default_rng(8), CONFIG, "blur")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_people_are_drawn():
    # Same background and layout draws, different counts: more people change more pixels.
    empty, _ = render_scene(0, np.random.default_rng(3), CONFIG)
    few, _ = render_scene(5, np.random.default_rng(3), CONFIG)
    many, _ = render_scene(40, np.random.default_rng(3), CONFIG)
    assert (np.abs(many.astype(int) - empty).sum(axis=2) > 30).mean() > \
        (np.abs(few.astype(int) - empty).sum(axis=2) > 30).mean()


def test_audio_grows_louder_with_the_count():
    rms = {count: np.median([_rms(render_scene(count, np.random.default_rng(s), CONFIG)[1])
                             for s in range(12)])
           for count in (0, 8, 40)}
    assert rms[0] < rms[8] < rms[40]
    # Incoherent voices: RMS grows about with the square root of the talkers (sqrt(5) = 2.2
    # here), less the scenes' random liveliness and gain; measured 1.7.
    assert rms[40] > 1.4 * rms[8]


def test_degradations_do_what_they_say():
    rng = lambda: np.random.default_rng(11)  # noqa: E731  same layout for every variant
    clean, _ = render_scene(25, rng(), CONFIG)
    dark, _ = render_scene(25, rng(), CONFIG, "dark")
    blur, _ = render_scene(25, rng(), CONFIG, "blur")
    occluded, _ = render_scene(25, rng(), CONFIG, "occluded")
    assert dark.mean() < 0.3 * clean.mean()

    def edges(img):  # fraction of strong horizontal steps (well above the camera noise)
        return (np.abs(np.diff(img.astype(float), axis=1)) > 20).mean()

    assert edges(blur) < 0.2 * edges(clean)
    changed = (np.abs(occluded.astype(int) - clean).sum(axis=2) > 30).mean()
    assert changed > 0.25


def test_render_scene_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="max_count"):
        render_scene(CONFIG.max_count + 1, np.random.default_rng(0), CONFIG)
    with pytest.raises(ConfigError, match="degradation"):
        render_scene(3, np.random.default_rng(0), CONFIG, "foggy")
    with pytest.raises(ConfigError):
        CrowdSceneConfig(image_size=(8, 8))


def test_stream_audio_is_continuous_across_calls():
    stream = SyntheticCrowdStream(seed=1)
    whole = stream.audio(0.0, 3.0)
    assert whole.shape == (48000,) and whole.dtype == np.float32
    # Chunks of an awkward length (as a capture thread might ask for) join exactly.
    edges = np.round(np.arange(0.0, 3.0, 0.0237) * 16000) / 16000
    pieces = [stream.audio(a, b) for a, b in zip(edges[:-1], edges[1:])]
    joined = np.concatenate(pieces)
    assert np.array_equal(joined, whole[: len(joined)])
    # A fresh stream with the same seed gives the same samples, in any order of calls.
    again = SyntheticCrowdStream(seed=1)
    assert np.array_equal(again.audio(2.0, 3.0), whole[32000:])
    assert not np.array_equal(SyntheticCrowdStream(seed=2).audio(0.0, 1.0), whole[:16000])


def test_stream_frames_and_count():
    stream = SyntheticCrowdStream(seed=4, start_count=10)
    assert stream.count(0.0) == 10
    image, count = stream.frame(0.0)
    assert image.shape == (*CONFIG.image_size, 3) and image.dtype == np.uint8
    assert count == 10
    counts = [stream.count(t) for t in np.arange(0.0, 120.0, 0.5)]
    assert all(0 <= c <= CONFIG.max_count for c in counts)
    assert len(set(counts)) > 5  # it drifts
    assert max(abs(a - b) for a, b in zip(counts, counts[1:])) <= 3  # slowly
    image_again, _ = SyntheticCrowdStream(seed=4, start_count=10).frame(0.0)
    assert np.array_equal(image, image_again)


def test_stream_degraded_periods_come_and_go():
    stream = SyntheticCrowdStream(seed=0)
    kinds = {stream.degradation(t) for t in np.arange(0.0, 400.0, 4.0)}
    assert kinds == {None, *DEGRADATIONS}
    clean = next(t for t in np.arange(0.0, 400.0, 4.0) if stream.degradation(t) is None)
    dark = next(t for t in np.arange(0.0, 400.0, 4.0) if stream.degradation(t) == "dark")
    assert stream.frame(dark)[0].mean() < 0.3 * stream.frame(clean)[0].mean()


def test_stream_is_fast_enough_for_real_time():
    stream = SyntheticCrowdStream(seed=3, start_count=CONFIG.max_count)  # the loudest case
    began = time.perf_counter()
    stream.audio(0.0, 4.0)
    audio_s = time.perf_counter() - began
    began = time.perf_counter()
    for k in range(20):
        stream.frame(k / 30)
    frame_s = (time.perf_counter() - began) / 20
    # Measured ~0.1 s for 4 s of audio and ~7 ms a frame on one core; bounds leave room for a
    # loaded CI machine but still catch a generator that cannot keep up.
    assert audio_s < 1.0, f"4 s of audio took {audio_s:.2f} s"
    assert frame_s < 0.05, f"a frame took {1e3 * frame_s:.1f} ms"


def test_stream_rejects_bad_intervals():
    stream = SyntheticCrowdStream(seed=0)
    with pytest.raises(ConfigError):
        stream.audio(1.0, 0.5)
    with pytest.raises(ConfigError):
        stream.audio(-1.0, 0.5)
    assert stream.audio(1.0, 1.0).shape == (0,)
