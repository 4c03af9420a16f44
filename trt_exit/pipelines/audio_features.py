"""Log-mel spectrograms on the host, shared by training and the live pipelines.

Decision: deployed graphs take a precomputed log-mel spectrogram, not raw audio. The STFT of one
second of audio costs well under a millisecond on a Jetson's CPU, runs in the capture thread in
parallel with the GPU, and keeps FFT ops (which ONNX expresses as ``DFT``, poorly supported by
TensorRT parsers) out of the engines. Training and deployment call the same function, so the
features cannot drift apart.

A :class:`LogMelConfig` is stored in the manifest's ``preprocessing["audio"]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from trt_exit.errors import ConfigError, InputError


@dataclass(frozen=True)
class LogMelConfig:
    """How a waveform becomes the model's audio input.

    Attributes:
        sample_rate: Rate the model expects, in Hz; other rates are resampled.
        window_s: Seconds of audio per input (the window ending at the video frame).
        n_fft: FFT size in samples.
        win_length: Hann window length in samples (<= n_fft).
        hop_length: Samples between frames; frames = window samples // hop_length.
        n_mels: Mel bands.
        f_min_hz: Lowest band edge.
        f_max_hz: Highest band edge (None: Nyquist).
        log_offset: Added before the log so silence stays finite.
        mean: Subtracted after the log (fitted on training data, or 0).
        std: Divides after the mean (fitted on training data, or 1).
    """

    sample_rate: int = 16000
    window_s: float = 1.0
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min_hz: float = 20.0
    f_max_hz: float | None = None
    log_offset: float = 1e-6
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft or self.hop_length <= 0 or self.n_mels <= 0:
            raise ConfigError(f"inconsistent log-mel settings: {self}")
        if self.sample_rate <= 0 or self.window_s <= 0:
            raise ConfigError("sample_rate and window_s must be positive")

    @property
    def window_samples(self) -> int:
        """Samples per input window."""
        return int(round(self.sample_rate * self.window_s))

    @property
    def frames(self) -> int:
        """Spectrogram frames per input window."""
        return self.window_samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-sample feature shape: (1, n_mels, frames)."""
        return (1, self.n_mels, self.frames)

    def to_dict(self) -> dict[str, Any]:
        return {"features": "log_mel", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LogMelConfig":
        data = {k: v for k, v in data.items() if k != "features"}
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad audio preprocessing {data!r}: {exc}") from exc


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float,
                   f_max: float) -> np.ndarray:
    """Triangular HTK-mel filters, (n_mels, n_fft // 2 + 1) float32, each peaking at 1."""
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / np.maximum(center - lower, 1e-9)
    falling = (upper - bins[None, :]) / np.maximum(upper - center, 1e-9)
    return np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)


@lru_cache(maxsize=16)
def _window(win_length: int, n_fft: int) -> np.ndarray:
    window = np.hanning(win_length + 1)[:-1].astype(np.float32)  # periodic Hann
    padded = np.zeros(n_fft, np.float32)
    start = (n_fft - win_length) // 2
    padded[start : start + win_length] = window
    return padded


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling of a (..., T) waveform (scipy's ``resample_poly``)."""
    if from_rate == to_rate:
        return np.asarray(waveform, dtype=np.float32)
    if from_rate <= 0 or to_rate <= 0:
        raise InputError(f"cannot resample from {from_rate} Hz to {to_rate} Hz")
    from scipy.signal import resample_poly

    g = math.gcd(int(from_rate), int(to_rate))
    out = resample_poly(np.asarray(waveform, dtype=np.float32), to_rate // g, from_rate // g, axis=-1)
    return out.astype(np.float32)


def fit_window(waveform: np.ndarray, samples: int) -> np.ndarray:
    """The last ``samples`` of a (..., T) waveform, left-padded with zeros when shorter."""
    waveform = np.asarray(waveform, dtype=np.float32)
    length = waveform.shape[-1]
    if length >= samples:
        return waveform[..., length - samples :]
    pad = [(0, 0)] * (waveform.ndim - 1) + [(samples - length, 0)]
    return np.pad(waveform, pad)


def log_mel(waveform: np.ndarray, config: LogMelConfig = LogMelConfig(),
            sample_rate: int | None = None) -> np.ndarray:
    """Normalized log-mel spectrogram of the window ending at the last sample.

    Args:
        waveform: (T,) or (B, T) float samples in [-1, 1] (mono).
        config: Feature settings.
        sample_rate: Rate of ``waveform``; resampled to ``config.sample_rate`` if different.

    Returns:
        (1, n_mels, frames) for a (T,) input, (B, 1, n_mels, frames) for (B, T); float32.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim not in (1, 2):
        raise InputError(f"audio must be (T,) or (B, T) mono samples, got shape {waveform.shape}")
    if not np.isfinite(waveform).all():
        raise InputError("audio contains NaN or Inf samples")
    single = waveform.ndim == 1
    batch = waveform[None] if single else waveform
    if sample_rate is not None:
        batch = resample(batch, sample_rate, config.sample_rate)
    batch = fit_window(batch, config.window_samples)  # (B, T)
    pad = config.n_fft // 2
    padded = np.pad(batch, ((0, 0), (pad, pad)), mode="reflect")
    starts = np.arange(config.frames) * config.hop_length
    index = starts[:, None] + np.arange(config.n_fft)[None, :]  # (F, n_fft)
    frames = padded[:, index] * _window(config.win_length, config.n_fft)  # (B, F, n_fft)
    power = np.abs(np.fft.rfft(frames, n=config.n_fft, axis=-1)) ** 2  # (B, F, n_fft/2+1)
    f_max = config.f_max_hz or config.sample_rate / 2
    filters = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.f_min_hz,
                             f_max)  # (M, n_fft/2+1)
    # One 2-D product: numpy's stacked matmul against a transposed matrix is ~50x slower.
    mel = (power.astype(np.float32).reshape(-1, power.shape[-1]) @ filters.T).reshape(
        *power.shape[:-1], config.n_mels)  # (B, F, M)
    features = (np.log(mel + config.log_offset) - config.mean) / config.std
    features = features.transpose(0, 2, 1)[:, None].astype(np.float32)  # (B, 1, M, F)
    return features[0] if single else features
