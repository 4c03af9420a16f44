"""Host log-mel features shared by training and the live pipelines."""

from __future__ import annotations

import numpy as np
import pytest

from trt_exit.errors import ConfigError, InputError
from trt_exit.pipelines.audio_features import LogMelConfig, fit_window, log_mel, resample


def _tone(freq_hz, rate=16000, seconds=1.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def test_shape_and_band_of_a_tone():
    config = LogMelConfig()
    low, high = log_mel(_tone(300), config), log_mel(_tone(4000), config)
    assert low.shape == config.shape == (1, 64, 100) and low.dtype == np.float32
    # the loudest band follows the tone's frequency
    assert low[0].mean(axis=1).argmax() < high[0].mean(axis=1).argmax()
    batch = log_mel(np.stack([_tone(300), _tone(4000)]), config)
    np.testing.assert_allclose(batch[0], low, atol=1e-5)


def test_resampling_gives_the_same_features():
    config = LogMelConfig()
    native = log_mel(_tone(1000), config)
    from_44k = log_mel(_tone(1000, rate=44100), config, sample_rate=44100)
    assert np.abs(native - from_44k)[:, :, 5:-5].mean() < 0.1
    assert resample(_tone(1000, 48000), 48000, 16000).shape == (16000,)


def test_short_audio_is_left_padded_and_long_audio_keeps_the_end():
    x = np.arange(10, dtype=np.float32)
    assert fit_window(x, 4).tolist() == [6, 7, 8, 9]
    assert fit_window(x[:2], 4).tolist() == [0, 0, 0, 1]


def test_bad_audio():
    with pytest.raises(InputError, match="NaN or Inf"):
        log_mel(np.full(16000, np.nan, np.float32))
    with pytest.raises(InputError, match="mono"):
        log_mel(np.zeros((1, 2, 16000), np.float32))
    with pytest.raises(ConfigError):
        LogMelConfig(win_length=1024, n_fft=512)
    assert LogMelConfig.from_dict(LogMelConfig().to_dict()) == LogMelConfig()
