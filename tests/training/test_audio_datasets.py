"""Speech Commands folder loader, WAV reading, and the generated audio classes."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.models.audio_vit import AUDIO_LOG_MEL, SYNTHETIC_AUDIO_CLASSES
from trt_exit.pipelines.audio_features import log_mel
from trt_exit.training.audio_datasets import (
    load_speech_commands,
    load_synthetic_audio,
    read_wav,
    synthetic_clip,
    write_wav,
)
from trt_exit.training.datasets import load_dataset


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_pcm_widths(tmp_path, width):
    samples = np.sin(np.linspace(0, 40, 800)) * 0.5
    scale = {1: 127, 2: 32767, 3: 8388607, 4: 2147483647}[width]
    ints = np.round(samples * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints)
    path = tmp_path / "x.wav"
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(width)
        handle.setframerate(8000)
        handle.writeframes(raw)
    read, rate = read_wav(path)
    assert rate == 8000 and read.dtype == np.float32
    assert np.abs(read - samples).max() < 0.02


def test_read_wav_float_and_stereo(tmp_path):
    from scipy.io import wavfile

    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.1)], axis=1).astype(np.float32)
    wavfile.write(tmp_path / "f.wav", 16000, stereo)  # IEEE float: not readable by wave
    read, rate = read_wav(tmp_path / "f.wav")
    assert rate == 16000 and np.allclose(read, 0.2)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ArtifactError):
        read_wav(tmp_path / "bad.wav")


def _speech_commands_tree(root, words, files_per_word=4):
    rng = np.random.default_rng(0)
    val, test = [], []
    for word in words:
        (root / word).mkdir(parents=True)
        for i in range(files_per_word):
            name = f"{word}_{i}_nohash_0.wav"
            write_wav(root / word / name, 0.2 * rng.standard_normal(12000), 16000)  # 0.75 s
            (val if i == 1 else test if i == 2 else []).append(f"{word}/{name}")
    (root / "_background_noise_").mkdir()
    write_wav(root / "_background_noise_" / "noise.wav", rng.standard_normal(16000) * 0.1, 16000)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")


def test_speech_commands_layout(tmp_path):
    _speech_commands_tree(tmp_path, ["yes", "no", "up"])
    splits = load_speech_commands(root=str(tmp_path))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    train = splits["train"]
    assert train.inputs[tn.AUDIO].shape == (6, *AUDIO_LOG_MEL.shape)
    # Labels index the 35-word list; missing words are reported, not fatal.
    from trt_exit.models.audio_vit import SPEECH_COMMANDS_WORDS

    expected = {SPEECH_COMMANDS_WORDS.index(w) for w in ("yes", "no", "up")}
    assert set(train.targets.tolist()) == expected
    assert "backward" in train.info["missing_words"]
    # Features are exactly log_mel of the file (short clips padded with silence in front).
    samples, rate = read_wav(tmp_path / "no" / "no_0_nohash_0.wav")
    index = [i for i, t in enumerate(train.targets) if t == SPEECH_COMMANDS_WORDS.index("no")][0]
    assert np.allclose(train.inputs[tn.AUDIO][index], log_mel(samples, AUDIO_LOG_MEL, rate))
    subset = load_dataset("speech_commands", root=str(tmp_path), words=["up", "yes"],
                          limit_per_class=1)
    assert subset["train"].targets.tolist() == [0, 1]


def test_speech_commands_errors(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        load_speech_commands()
    (tmp_path / "yes").mkdir()
    with pytest.raises(ArtifactError, match="validation_list"):
        load_speech_commands(root=str(tmp_path))


def test_synthetic_audio_classes_are_balanced_and_distinct():
    splits = load_synthetic_audio(seed=0, per_class=(4, 2, 2))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 12, 12]
    assert np.bincount(splits["train"].targets).tolist() == [4] * len(SYNTHETIC_AUDIO_CLASSES)
    assert splits["train"].inputs[tn.AUDIO].shape == (24, *AUDIO_LOG_MEL.shape)
    # Low vs high tones differ where their energy sits: the lower vs the upper mel bands.
    low = log_mel(synthetic_clip(0, np.random.default_rng(1)), AUDIO_LOG_MEL)[0]
    high = log_mel(synthetic_clip(1, np.random.default_rng(1)), AUDIO_LOG_MEL)[0]
    assert low.max(axis=1).argmax() < 16 <= high.max(axis=1).argmax()
    # Chirps rise or fall: the loudest band moves up or down over time.
    up = log_mel(synthetic_clip(2, np.random.default_rng(2)), AUDIO_LOG_MEL)[0]
    down = log_mel(synthetic_clip(3, np.random.default_rng(2)), AUDIO_LOG_MEL)[0]
    loud_up = [f for f in range(up.shape[1]) if up[:, f].max() > up.max() - 0.5]
    loud_down = [f for f in range(down.shape[1]) if down[:, f].max() > down.max() - 0.5]
    assert up[:, loud_up[-1]].argmax() > up[:, loud_up[0]].argmax()
    assert down[:, loud_down[-1]].argmax() < down[:, loud_down[0]].argmax()
    for label in range(6):
        clip = synthetic_clip(label, np.random.default_rng(label))
        assert clip.shape == (16000,) and np.abs(clip).max() <= 1.0
    with pytest.raises(ConfigError):
        synthetic_clip(6, np.random.default_rng(0))
