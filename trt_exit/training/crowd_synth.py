"""Synthetic crowd scenes with sound: an image and the 1 s of audio ending at it, and a count.

This stands in for DISCO (Hu et al. 2020: 1,935 images with 1 s of audio and head annotations)
where the real data is not at hand, and feeds the live pipeline's ``synthetic://crowd`` sources.
Everything here is our own design, chosen so that the premise of audiovisual crowd counting can
be tested: the picture shows the people, the sound carries partial, noisier evidence of how many
there are, and when the picture is degraded the sound should help.

**Picture.** A street-like scene (sky or wall above a horizon, textured ground, a few static
boxes as clutter) seen in perspective: people nearer the bottom are drawn larger. A person is a
body (an ellipse in a clothing colour) and a head (a skin-toned disc with darker hair). People
stand in 1-3 groups plus stragglers, so density varies across the image and an occluder hides
an unknown share of them; they are drawn far to near, so near people hide far ones, as in real
crowds. Degradations, where audio should help (DISCO's premise):

* ``dark``: brightness scaled to 6-15 %, desaturated, with sensor noise (sigma 3-8 levels);
* ``blur``: Gaussian blur of 2.5-4 px (at 96 px height), merging heads into blobs;
* ``occluded``: one or two foreground occluders (walls, vehicles) covering 40-70 % of the
  image width from above the horizon down, where people may or may not stand.

**Sound.** Each talking person is a voice: a harmonic tone (fundamental 90-280 Hz, six
harmonics with 1/h amplitudes, read from a wavetable) under a syllable envelope (3-6 bursts a
second); louder when nearer. Each scene draws how lively its crowd is (15-95 % of the people
talk in a given second) and then who talks (binomial), so the number of voices is a noisy
function of the count. With few voices the sound is a few distinct lines that come and go;
with many it becomes a dense, steady babble: loudness *and* texture grow with the count.
Ambient noise at a random level (white, -46 to -30 dBFS), a random microphone gain of +-6 dB
and, now and then, a horn-like distractor tone that has nothing to do with the crowd keep
audio-only counting honest. Samples are float32 in [-1, 1], clipped.

**Streams.** :class:`SyntheticCrowdStream` is a never-ending scene for live pipelines: a fixed
pool of people (seeded) of whom the first ``count(t)`` are present; the count follows a smooth
seeded random walk (cosine interpolation between a new value every ``drift_period_s``); degraded
periods come and go (one draw per ``degradation_period_s``). Audio is a closed-form function of
the absolute sample index (phases from absolute time, noise from block-seeded generators), so
consecutive calls join without a seam and any interval can be asked for in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from trt_exit.errors import ConfigError

#: Image degradations :func:`render_scene` and the stream can apply.
DEGRADATIONS = ("dark", "blur", "occluded")

_TABLE_SIZE = 2048
_HARMONICS = 6
_ENVELOPE_STEP = 16  # samples per envelope value (1 ms at 16 kHz)


@dataclass(frozen=True)
class CrowdSceneConfig:
    """What a synthetic crowd scene looks and sounds like.

    Attributes:
        image_size: (height, width) of the rendered image in pixels.
        sample_rate: Audio samples per second, in Hz.
        window_s: Seconds of audio per scene (the window ending at the frame).
        max_count: Largest number of people in a scene.
        talk_fraction: Expected fraction of the people talking in a given second.
        talk_fraction_spread: Scenes draw their talking fraction uniformly from
            ``talk_fraction +- talk_fraction_spread`` (quiet and lively crowds).
        voice_level: Peak amplitude of one voice at mid distance (before the microphone gain).
        noise_dbfs_range: Ambient white-noise level range (RMS, dB full scale).
        mic_gain_db: Random microphone gain per scene, uniform in +-this many dB.
        distractor_probability: Chance that a scene (or a stream second) has a horn-like tone
            unrelated to the crowd.
        horizon_frac: Height of the horizon as a fraction of the image height.
        head_radius_frac: Head radius of the nearest people as a fraction of the image height.
    """

    image_size: tuple[int, int] = (96, 128)
    sample_rate: int = 16000
    window_s: float = 1.0
    max_count: int = 40
    talk_fraction: float = 0.55
    talk_fraction_spread: float = 0.4
    voice_level: float = 0.05
    noise_dbfs_range: tuple[float, float] = (-46.0, -30.0)
    mic_gain_db: float = 6.0
    distractor_probability: float = 0.15
    horizon_frac: float = 0.3
    head_radius_frac: float = 1.0 / 22.0

    def __post_init__(self) -> None:
        height, width = self.image_size
        if height < 16 or width < 16:
            raise ConfigError(f"image_size {self.image_size} is too small: use at least 16x16")
        if self.sample_rate <= 0 or self.window_s <= 0:
            raise ConfigError("sample_rate and window_s must be positive")
        if self.max_count < 1:
            raise ConfigError(f"max_count must be at least 1, got {self.max_count}")
        if not 0.0 <= self.talk_fraction <= 1.0:
            raise ConfigError(f"talk_fraction must be in [0, 1], got {self.talk_fraction}")

    @property
    def window_samples(self) -> int:
        """Audio samples per scene."""
        return int(round(self.sample_rate * self.window_s))


# --------------------------------------------------------------------------- people


@dataclass
class _People:
    """Attributes of a group of people, one row per person (arrays of equal length)."""

    x: np.ndarray  # (P,) foot position, pixels
    y: np.ndarray  # (P,) foot position, pixels (larger = nearer)
    clothes: np.ndarray  # (P, 3) RGB
    skin: np.ndarray  # (P, 3) RGB
    hair: np.ndarray  # (P, 3) RGB
    f0_hz: np.ndarray  # (P,) voice fundamental
    syllable_hz: np.ndarray  # (P,) syllable rate
    phase: np.ndarray  # (P, 2) voice and syllable phases, cycles
    loudness: np.ndarray  # (P,) voice amplitude factor

    def __len__(self) -> int:
        return len(self.x)


def _random_people(count: int, rng: np.random.Generator, config: CrowdSceneConfig) -> _People:
    """People placed in 1-3 groups plus stragglers on the ground plane."""
    height, width = config.image_size
    top = config.horizon_frac * height + 0.03 * height  # far edge of where feet can be
    groups = rng.integers(1, 4)
    centers = np.stack([rng.uniform(0.1, 0.9, groups) * width,
                        rng.uniform(top, height * 1.02, groups)], axis=1)
    spread = rng.uniform(0.06, 0.2, groups) * width
    member = rng.integers(0, groups, count)
    grouped = rng.random(count) < 0.75
    x = np.where(grouped, centers[member, 0] + rng.normal(0, 1, count) * spread[member],
                 rng.uniform(0, width, count))
    y = np.where(grouped, centers[member, 1] + rng.normal(0, 0.5, count) * spread[member],
                 rng.uniform(top, height * 1.05, count))
    x = np.clip(x, 0.02 * width, 0.98 * width)
    y = np.clip(y, top, height * 1.05)
    return _people_at(x, y, rng, config)


def _people_at(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
               config: CrowdSceneConfig) -> _People:
    count = len(x)
    clothes = rng.uniform(20, 235, (count, 3))
    skin_tone = rng.uniform(0.0, 1.0, (count, 1))
    skin = (1 - skin_tone) * np.array([235, 195, 160]) + skin_tone * np.array([95, 60, 40])
    hair = rng.uniform(10, 90, (count, 1)) * np.array([1.0, 0.85, 0.7])
    nearness = _nearness(y, config)
    return _People(
        x=x, y=y, clothes=clothes, skin=skin, hair=hair,
        f0_hz=np.exp(rng.uniform(np.log(90.0), np.log(280.0), count)),
        syllable_hz=rng.uniform(3.0, 6.0, count),
        phase=rng.random((count, 2)),
        loudness=rng.uniform(0.6, 1.0, count) * (0.5 + nearness),
    )


def _nearness(y: np.ndarray, config: CrowdSceneConfig) -> np.ndarray:
    """0 at the horizon, 1 at the bottom edge of the image."""
    height = config.image_size[0]
    horizon = config.horizon_frac * height
    return np.clip((y - horizon) / (height - horizon), 0.0, 1.1)


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:height, 0:width].astype(np.float32)


def _draw_people(image: np.ndarray, people: _People, config: CrowdSceneConfig,
                 present: np.ndarray | None = None) -> None:
    """Draws ``people`` (those with ``present`` set) into ``image`` in place, far to near."""
    height, width = config.image_size
    rows, cols = _grid(height, width)
    scale = 0.3 + 0.7 * _nearness(people.y, config)
    radius = np.maximum(scale * config.head_radius_frac * height, 0.8)
    order = np.argsort(people.y)
    for i in order:
        if present is not None and not present[i]:
            continue
        r = radius[i]
        foot_y, cx = people.y[i], people.x[i]
        body_h, body_w = 3.6 * r, 1.25 * r
        head_cy = foot_y - 2 * body_h - 0.8 * r
        y0 = max(int(head_cy - r - 1), 0)
        y1 = min(int(foot_y + 1), height)
        x0 = max(int(cx - body_w - 1), 0)
        x1 = min(int(cx + body_w + 2), width)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = rows[y0:y1, x0:x1], cols[y0:y1, x0:x1]
        patch = image[y0:y1, x0:x1]
        body_cy = foot_y - body_h
        body = ((xx - cx) / body_w) ** 2 + ((yy - body_cy) / body_h) ** 2 <= 1.0
        patch[body] = people.clothes[i]
        head = (xx - cx) ** 2 + (yy - head_cy) ** 2 <= r * r
        patch[head] = people.skin[i]
        hair = head & (yy < head_cy - 0.25 * r)
        patch[hair] = people.hair[i]


# --------------------------------------------------------------------------- picture


def _background(rng: np.random.Generator, config: CrowdSceneConfig) -> np.ndarray:
    """Sky or wall, textured ground, and a few boxes of clutter; (H, W, 3) float32."""
    height, width = config.image_size
    rows, cols = _grid(height, width)
    horizon = int(config.horizon_frac * height)
    upper = rng.uniform(60, 220, 3)
    ground = rng.uniform(50, 170, 3)
    image = np.empty((height, width, 3), np.float32)
    fade = (rows[:horizon, :, None] / max(horizon, 1))
    image[:horizon] = upper * (1.0 - 0.3 * fade)
    depth = (rows[horizon:, :, None] - horizon) / max(height - horizon, 1)
    image[horizon:] = ground * (0.8 + 0.3 * depth)
    # Low-frequency texture: a coarse random grid, upsampled.
    coarse = rng.normal(0, 12, (height // 8 + 2, width // 8 + 2, 1)).astype(np.float32)
    image += np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:height, :width]
    for _ in range(rng.integers(1, 5)):  # boxes: buildings, stalls, benches
        bw, bh = rng.uniform(0.05, 0.25) * width, rng.uniform(0.05, 0.3) * height
        bx = rng.uniform(0, width - bw)
        by = rng.uniform(0.5, 1.0) * horizon + rng.uniform(-0.1, 0.3) * bh
        inside = (cols >= bx) & (cols < bx + bw) & (rows >= by - bh) & (rows < by)
        image[inside] = rng.uniform(30, 220, 3)
    return image


def _occlude(image: np.ndarray, rng: np.random.Generator, config: CrowdSceneConfig) -> None:
    """One or two foreground occluders covering 40-70 % of the width, in place."""
    height, width = config.image_size
    rows, cols = _grid(height, width)
    horizon = config.horizon_frac * height
    target = rng.uniform(0.4, 0.7) * width
    pieces = 1 if rng.random() < 0.5 else 2
    widths = target * (np.array([1.0]) if pieces == 1 else rng.dirichlet([3, 3]))
    for piece_width in widths:
        x0 = rng.uniform(-0.1 * width, width - 0.9 * piece_width)
        top = rng.uniform(0.0, horizon + 0.15 * height)
        inside = (cols >= x0) & (cols < x0 + piece_width) & (rows >= top)
        color = rng.uniform(20, 200, 3)
        stripes = 0.85 + 0.15 * np.sign(np.sin(cols * rng.uniform(0.3, 1.2)))[..., None]
        image[inside] = (color * stripes)[inside]


def _degrade(image: np.ndarray, kind: str, rng: np.random.Generator,
             config: CrowdSceneConfig) -> np.ndarray:
    """Applies an image degradation to a float32 (H, W, 3) image; returns the new image."""
    height = config.image_size[0]
    if kind == "occluded":
        _occlude(image, rng, config)
        return image
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = rng.uniform(2.5, 4.0) * height / 96.0
        return gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest")
    if kind == "dark":
        gray = image.mean(axis=2, keepdims=True)
        image = 0.4 * image + 0.6 * gray
        image = image * rng.uniform(0.06, 0.15)
        return image + rng.normal(0, rng.uniform(3.0, 8.0), image.shape).astype(np.float32)
    raise ConfigError(f"unknown degradation {kind!r}; choose one of {DEGRADATIONS} or None")


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = image + rng.normal(0, 2.0, image.shape).astype(np.float32)  # camera noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- sound


@lru_cache(maxsize=1)
def _voice_table() -> np.ndarray:
    """One period of the voice waveform: six harmonics with 1/h amplitudes, peak 1."""
    phase = np.arange(_TABLE_SIZE) / _TABLE_SIZE
    wave = sum(np.sin(2 * np.pi * h * phase + 0.7 * h) / h for h in range(1, _HARMONICS + 1))
    return (wave / np.abs(wave).max()).astype(np.float32)


def _voices(people: _People, start_s: float, samples: int, sample_rate: int,
            gains: np.ndarray) -> np.ndarray:
    """Sum of the people's voices over ``samples`` samples starting at absolute ``start_s``.

    Args:
        people: The speakers.
        start_s: Absolute start time (phases are functions of absolute time, so adjacent
            windows join seamlessly).
        samples: Window length in samples.
        sample_rate: Hz.
        gains: (P,) or (P, samples) per-person gain (0 = silent).

    Returns:
        (samples,) float32.
    """
    if len(people) == 0:
        return np.zeros(samples, np.float32)
    gains = np.asarray(gains, np.float32).reshape(len(people), -1)
    speaking = np.flatnonzero(gains.any(axis=1))
    if len(speaking) == 0:
        return np.zeros(samples, np.float32)
    gains = gains[speaking]
    f0 = people.f0_hz[speaking]
    rate = people.syllable_hz[speaking]
    # Fractional phases at the window start in float64 (absolute times can be large), then
    # float32 within the window.
    voice0 = np.mod(f0 * start_s + people.phase[speaking, 0], 1.0).astype(np.float32)
    syll0 = np.mod(rate * start_s + people.phase[speaking, 1], 1.0).astype(np.float32)
    t = np.arange(samples, dtype=np.float32) / sample_rate  # (T,) seconds into the window
    cycles = voice0[:, None] + f0.astype(np.float32)[:, None] * t[None, :]  # (S, T)
    index = (cycles * _TABLE_SIZE).astype(np.int32) & (_TABLE_SIZE - 1)
    wave = _voice_table()[index]  # (S, T)
    # The envelope (syllables, gains) is slow: compute it every _ENVELOPE_STEP samples.
    coarse = t[::_ENVELOPE_STEP]  # (C,)
    syllable = np.sin(2 * np.pi * (syll0[:, None] + rate.astype(np.float32)[:, None] * coarse))
    envelope = np.maximum(syllable, 0.0) ** 2  # (S, C) bursts of ~1/rate s
    envelope *= people.loudness[speaking, None].astype(np.float32)
    envelope = envelope * (gains if gains.shape[1] == 1 else gains[:, ::_ENVELOPE_STEP])
    envelope = np.repeat(envelope, _ENVELOPE_STEP, axis=1)[:, :samples]  # (S, T)
    return np.einsum("st,st->t", wave, envelope)


def _horn(start_s: float, samples: int, sample_rate: int, f0_hz: float, level: float,
          onset_s: float, duration_s: float) -> np.ndarray:
    """A horn-like two-tone distractor between ``onset_s`` and ``onset_s + duration_s``."""
    t = start_s + np.arange(samples) / sample_rate
    on = ((t >= onset_s) & (t < onset_s + duration_s)).astype(np.float32)
    tone = np.sign(np.sin(2 * np.pi * f0_hz * t)) * 0.5 + np.sin(2 * np.pi * 1.26 * f0_hz * t)
    return (level * on * tone).astype(np.float32)


# --------------------------------------------------------------------------- scenes


def render_scene(count: int, rng: np.random.Generator,
                 config: CrowdSceneConfig = CrowdSceneConfig(),
                 degradation: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One scene with ``count`` people: its image and the audio window ending at it.

    Args:
        count: People in the scene, 0 to ``config.max_count``.
        rng: Source of all randomness (layout, looks, voices, noise).
        config: Scene settings.
        degradation: None for a clean image, or one of :data:`DEGRADATIONS`.

    Returns:
        ``(image, audio)``: (H, W, 3) uint8 RGB, and (round(sample_rate * window_s),) float32
        samples in [-1, 1].
    """
    if not 0 <= count <= config.max_count:
        raise ConfigError(f"count {count} is outside [0, {config.max_count}] (max_count)")
    if degradation is not None and degradation not in DEGRADATIONS:
        raise ConfigError(f"unknown degradation {degradation!r}; choose one of {DEGRADATIONS} or None")
    people = _random_people(count, rng, config)
    image = _background(rng, config)
    _draw_people(image, people, config)
    if degradation is not None:
        image = _degrade(image, degradation, rng, config)
    image = _finish(image, rng)

    samples = config.window_samples
    fraction = np.clip(config.talk_fraction + rng.uniform(-1, 1) * config.talk_fraction_spread,
                       0.0, 1.0)
    talking = (rng.random(count) < fraction).astype(np.float32)
    start_s = float(rng.uniform(0, 1000))  # random absolute time: random envelope phases
    audio = config.voice_level * _voices(people, start_s, samples, config.sample_rate, talking)
    noise_db = rng.uniform(*config.noise_dbfs_range)
    audio += (10 ** (noise_db / 20)) * rng.standard_normal(samples).astype(np.float32)
    if rng.random() < config.distractor_probability:
        duration = rng.uniform(0.2, 0.8)
        audio += _horn(0.0, samples, config.sample_rate, rng.uniform(300, 600),
                       config.voice_level * rng.uniform(1.0, 4.0),
                       rng.uniform(0, config.window_s - duration), duration)
    audio *= 10 ** (rng.uniform(-config.mic_gain_db, config.mic_gain_db) / 20)
    return image, np.clip(audio, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- streams


class SyntheticCrowdStream:
    """A never-ending synthetic scene: the count drifts slowly over time (seeded); degraded
    periods come and go.

    Frames and audio are pure functions of time and the seed: the same seed gives the same
    stream on every machine, :meth:`audio` returns the same samples however the time axis is
    cut into calls, and nothing has to be generated in order.

    Args:
        seed: Seed of everything (people, count walk, degradations, noise).
        config: Scene settings (image size, sample rate, max count).
        drift_period_s: Seconds between the count's random-walk knots.
        degradation_period_s: Length of the periods over which the degradation is drawn.
        degraded_fraction: Fraction of those periods that are degraded (each degradation
            equally likely).
        start_count: Count at t = 0 (None: random).
    """

    #: Audio is generated in blocks of this many seconds, each with its own seeded noise.
    BLOCK_S = 0.1

    def __init__(self, seed: int = 0, config: CrowdSceneConfig = CrowdSceneConfig(),
                 drift_period_s: float = 10.0, degradation_period_s: float = 8.0,
                 degraded_fraction: float = 0.5, start_count: int | None = None):
        if drift_period_s <= 0 or degradation_period_s <= 0:
            raise ConfigError("drift_period_s and degradation_period_s must be positive")
        if not 0.0 <= degraded_fraction <= 1.0:
            raise ConfigError(f"degraded_fraction must be in [0, 1], got {degraded_fraction}")
        if start_count is not None and not 0 <= start_count <= config.max_count:
            raise ConfigError(f"start_count {start_count} is outside [0, {config.max_count}]")
        self.seed = int(seed)
        self.config = config
        self.drift_period_s = float(drift_period_s)
        self.degradation_period_s = float(degradation_period_s)
        self.degraded_fraction = float(degraded_fraction)
        self.start_count = start_count
        rng = np.random.default_rng([self.seed, 0])
        # A fixed pool of people; person i is present while i < count(t). Their order is
        # random, so people come and go all over the scene.
        self._people = _random_people(config.max_count, rng, config)
        self._sway = rng.uniform(0.0, 1.0, (config.max_count, 3))  # amplitude, rate, phase
        # Each person talks in phrases: a slow on/off gate per person (rate, phase).
        self._phrase = np.stack([rng.uniform(0.05, 0.2, config.max_count),
                                 rng.random(config.max_count)], axis=1)
        self._background = _background(rng, config)
        self._noise_db = float(rng.uniform(*config.noise_dbfs_range))

    # ------------------------------------------------------------------ time functions

    def _knot(self, k: int) -> float:
        if k == 0 and self.start_count is not None:
            return float(self.start_count)
        return float(np.random.default_rng([self.seed, 1, k]).uniform(0, self.config.max_count))

    def level(self, t_s: float | np.ndarray) -> np.ndarray:
        """The count as a continuous value (before rounding) at time(s) ``t_s``."""
        t = np.asarray(t_s, dtype=np.float64)
        position = np.maximum(t, 0.0) / self.drift_period_s
        k = np.floor(position).astype(np.int64)
        frac = position - k
        knots = {int(i): self._knot(int(i)) for i in np.unique(np.stack([k, k + 1]))}
        left = np.array([knots[int(i)] for i in k.ravel()]).reshape(k.shape)
        right = np.array([knots[int(i) + 1] for i in k.ravel()]).reshape(k.shape)
        smooth = 0.5 - 0.5 * np.cos(np.pi * frac)
        return left + (right - left) * smooth

    def count(self, t_s: float) -> int:
        """True number of people at time ``t_s`` (seconds since the stream began)."""
        return int(np.round(self.level(t_s)))

    def degradation(self, t_s: float) -> str | None:
        """The image degradation in effect at time ``t_s`` (None: clean)."""
        period = int(math.floor(max(t_s, 0.0) / self.degradation_period_s))
        rng = np.random.default_rng([self.seed, 2, period])
        if rng.random() >= self.degraded_fraction:
            return None
        return DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]

    # ------------------------------------------------------------------ frames

    def frame(self, t_s: float) -> tuple[np.ndarray, int]:
        """The image at time ``t_s`` and the true count.

        Returns:
            ``(image, count)``: (H, W, 3) uint8 RGB and the number of people in it.
        """
        config = self.config
        count = self.count(t_s)
        present = np.arange(config.max_count) < count
        width = config.image_size[1]
        amp, rate, phase = self._sway.T
        people = self._people
        moved = _People(
            x=people.x + 0.03 * width * amp * np.sin(2 * np.pi * (0.05 + 0.1 * rate) * t_s + 2 * np.pi * phase),
            y=people.y, clothes=people.clothes, skin=people.skin, hair=people.hair,
            f0_hz=people.f0_hz, syllable_hz=people.syllable_hz, phase=people.phase,
            loudness=people.loudness)
        image = self._background.copy()
        _draw_people(image, moved, config, present)
        kind = self.degradation(t_s)
        period = int(math.floor(max(t_s, 0.0) / self.degradation_period_s))
        if kind is not None:
            # Degradation parameters (occluder placement, blur, darkness) stay put over the
            # period; only sensor noise changes from frame to frame.
            image = _degrade(image, kind, np.random.default_rng([self.seed, 3, period]), config)
        frame_rng = np.random.default_rng([self.seed, 4, int(round(t_s * 1000))])
        return _finish(image, frame_rng), count

    # ------------------------------------------------------------------ audio

    def audio(self, t0_s: float, t1_s: float) -> np.ndarray:
        """Samples of [t0_s, t1_s) at ``config.sample_rate``, float32 in [-1, 1].

        Sample ``n`` is at time ``n / sample_rate``; the interval covers samples
        ``round(t0_s * rate)`` to ``round(t1_s * rate)`` (exclusive), so calls on adjacent
        intervals join without a gap or an overlap.
        """
        rate = self.config.sample_rate
        first, last = int(round(t0_s * rate)), int(round(t1_s * rate))
        if last < first:
            raise ConfigError(f"audio interval [{t0_s}, {t1_s}) ends before it starts")
        if first < 0:
            raise ConfigError(f"the stream starts at t = 0; asked for audio from {t0_s} s")
        block = int(round(self.BLOCK_S * rate))
        pieces = []
        for b in range(first // block, (last - 1) // block + 1 if last > first else first // block):
            samples = self._block(b, block)
            lo, hi = max(first - b * block, 0), min(last - b * block, block)
            pieces.append(samples[lo:hi])
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

    def _block(self, b: int, block: int) -> np.ndarray:
        """Audio block ``b`` (samples ``b * block`` to ``(b + 1) * block``)."""
        config = self.config
        rate = config.sample_rate
        start_s = b * block / rate
        t = start_s + np.arange(0, block + 1, block // 4) / rate  # gate knots within the block
        level = self.level(t)  # (5,)
        index = np.arange(config.max_count)[:, None]
        presence = np.clip(level[None, :] - index, 0.0, 1.0)  # (P, 5) smooth arrival/departure
        phrase = np.clip(2.0 * np.sin(2 * np.pi * (self._phrase[:, :1] * t[None, :] + self._phrase[:, 1:]))
                         + 2.0 * config.talk_fraction - 1.0, 0.0, 1.0)
        knots = presence * phrase  # (P, 5)
        positions = np.arange(block)
        gains = np.stack([np.interp(positions, np.arange(0, block + 1, block // 4), g) for g in knots])
        audio = config.voice_level * _voices(self._people, start_s, block, rate, gains)
        rng = np.random.default_rng([self.seed, 5, b])
        audio += (10 ** (self._noise_db / 20)) * rng.standard_normal(block).astype(np.float32)
        second = int(math.floor(start_s))
        horn_rng = np.random.default_rng([self.seed, 6, second])
        if horn_rng.random() < config.distractor_probability:
            duration = horn_rng.uniform(0.2, 0.8)
            audio += _horn(start_s, block, rate, horn_rng.uniform(300, 600),
                           config.voice_level * horn_rng.uniform(1.0, 4.0),
                           second + horn_rng.uniform(0, 1 - duration), duration)
        return np.clip(audio, -1.0, 1.0).astype(np.float32)
