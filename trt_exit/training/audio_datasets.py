"""Audio classification datasets: Speech Commands from a folder, and a generated set for tests.

Both give splits of :class:`~trt_exit.training.datasets.Dataset` with one input,
``{"audio": (N, 1, n_mels, frames)}`` float32: the log-mel spectrogram of each clip computed by
:func:`trt_exit.pipelines.audio_features.log_mel` with the model's ``preprocessing["audio"]``
(default :data:`trt_exit.models.audio_vit.AUDIO_LOG_MEL`), the same function deployment uses.
Clips shorter than the window are padded with silence in front (``fit_window``), longer ones keep
their last second.

``speech_commands`` (:func:`load_speech_commands`; Warden 2018, CC BY 4.0): the standard layout,
one folder per word of 1 s 16 kHz mono WAVs, ``validation_list.txt`` and ``testing_list.txt``
listing the val and test files as ``word/file.wav``; every other file of a word folder is
training data; ``_background_noise_`` is not a class. Labels index
:data:`~trt_exit.models.audio_vit.SPEECH_COMMANDS_WORDS` (the 35 words of v0.02), so v0.01
folders (30 of those words) load too, with the missing words listed in ``info``.

``synthetic_audio`` (:func:`load_synthetic_audio`): six generated classes of one-second clips,
each a short event at a random time, level and pitch over white noise:

* ``low_tone``: a sine of 150-500 Hz lasting 0.25-0.7 s;
* ``high_tone``: a sine of 1.5-4 kHz lasting 0.25-0.7 s;
* ``chirp_up`` / ``chirp_down``: a linear sweep between 300-800 Hz and 2-4 kHz over 0.3-0.7 s,
  rising or falling (the same frequencies; only the direction tells them apart);
* ``noise_burst``: white noise lasting 0.15-0.5 s;
* ``pulses``: 3-6 clicks of 30 ms at 0.8-1.5 kHz spread over the second.

Event peak level -20 to -6 dBFS with 10 ms fades; background noise -55 to -35 dBFS RMS. Sample
``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])`` and its class is
``i % 6``, so every split is balanced and the same on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.training.datasets import Dataset, register_dataset

SPLITS = ("train", "val", "test")


def _log_mel_config(preprocessing: dict[str, Any] | None):
    from trt_exit.pipelines.audio_features import LogMelConfig

    if preprocessing is None:
        from trt_exit.models.audio_vit import AUDIO_LOG_MEL

        return AUDIO_LOG_MEL
    if "audio" not in preprocessing:
        raise ConfigError("audio datasets need preprocessing with an 'audio' entry "
                          "(a LogMelConfig dict)")
    return LogMelConfig.from_dict(preprocessing["audio"])


# --------------------------------------------------------------------------- WAV files


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of a WAV file.

    Reads 8/16/24/32-bit PCM with the standard library's ``wave`` module and float WAVs with
    ``scipy.io.wavfile``; channels are averaged.
    """
    import wave

    path = Path(path)
    try:
        with wave.open(str(path), "rb") as handle:
            rate = handle.getframerate()
            width = handle.getsampwidth()
            channels = handle.getnchannels()
            raw = handle.readframes(handle.getnframes())
    except wave.Error:  # not PCM (e.g. IEEE float): scipy reads those
        return _read_wav_scipy(path)
    except (OSError, EOFError) as exc:
        raise ArtifactError(f"cannot read the WAV file {path}: {exc}") from exc
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = np.where(ints >= 1 << 23, ints - (1 << 24), ints).astype(np.float32) / 8388608.0
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ArtifactError(f"{path}: unsupported sample width of {width} bytes")
    return samples.reshape(-1, channels).mean(axis=1), rate


def _read_wav_scipy(path: Path) -> tuple[np.ndarray, int]:
    import warnings

    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():  # unknown chunks (e.g. LIST metadata) are skipped
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            rate, data = wavfile.read(str(path))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the WAV file {path}: {exc}") from exc
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    data = data.astype(np.float32)
    return (data.mean(axis=1) if data.ndim == 2 else data), int(rate)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Writes mono float samples in [-1, 1] as a 16-bit PCM WAV (for tests and examples)."""
    import wave

    pcm = np.round(np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(int(sample_rate))
        handle.writeframes(pcm.tobytes())
    return Path(path)


# --------------------------------------------------------------------------- Speech Commands


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


def load_speech_commands(seed: int = 0, root: str | None = None,
                         words: tuple[str, ...] | list[str] | None = None,
                         limit_per_class: int | None = None,
                         preprocessing: dict[str, Any] | None = None) -> dict[str, Dataset]:
    """Speech Commands from its folder (see the module docstring for the layout).

    Args:
        seed: Unused (the split is the dataset's own lists); kept for the loader interface.
        root: The dataset folder (holding the word folders and the two lists).
        words: Class names in label order (default: the 35 words of v0.02). Folders of other
            words are skipped.
        limit_per_class: Read at most this many files per word and split (sorted), for quick
            runs.
        preprocessing: The model's preprocessing (default: ``{"audio": AUDIO_LOG_MEL}``).

    Returns:
        ``{"train", "val", "test"}`` classification datasets.
    """
    from trt_exit.models.audio_vit import SPEECH_COMMANDS_WORDS
    from trt_exit.pipelines.audio_features import log_mel

    if root is None:
        raise ConfigError("the speech_commands dataset needs its folder: pass root=PATH "
                          "(dataset_options={'root': PATH})")
    root_path = Path(root)
    if not root_path.is_dir():
        raise ArtifactError(f"Speech Commands folder {root_path} does not exist")
    words = tuple(words or SPEECH_COMMANDS_WORDS)
    mel = _log_mel_config(preprocessing)
    lists = {"val": _read_list(root_path / "validation_list.txt"),
             "test": _read_list(root_path / "testing_list.txt")}
    if not lists["val"] or not lists["test"]:
        raise ArtifactError(f"{root_path} lacks validation_list.txt or testing_list.txt (the "
                            f"standard Speech Commands split lists)")
    files: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    missing = []
    for label, word in enumerate(words):
        folder = root_path / word
        if not folder.is_dir():
            missing.append(word)
            continue
        per_split: dict[str, list[str]] = {split: [] for split in SPLITS}
        for wav in sorted(folder.glob("*.wav")):
            rel = f"{word}/{wav.name}"
            split = "val" if rel in lists["val"] else "test" if rel in lists["test"] else "train"
            per_split[split].append(rel)
        for split, rels in per_split.items():
            files[split].extend((rel, label) for rel in rels[:limit_per_class])
    if len(missing) == len(words):
        raise ArtifactError(f"none of the word folders {list(words)[:5]}... exist in {root_path}")
    out = {}
    for split in SPLITS:
        if not files[split]:
            raise ArtifactError(f"{root_path}: no {split} files for the chosen words")
        features = np.empty((len(files[split]), *mel.shape), np.float32)
        for i, (rel, _) in enumerate(files[split]):
            samples, rate = read_wav(root_path / rel)
            features[i] = log_mel(samples, mel, rate)
        labels = np.array([label for _, label in files[split]], np.int64)
        out[split] = Dataset({tn.AUDIO: features}, labels, "classification",
                             f"speech_commands/{split}",
                             {"source": "Speech Commands (Warden 2018), CC BY 4.0",
                              "root": str(root_path), "words": list(words),
                              "missing_words": missing,
                              "split": "validation_list.txt / testing_list.txt / the rest",
                              "limit_per_class": limit_per_class})
    return out


# --------------------------------------------------------------------------- generated


def synthetic_clip(label: int, rng: np.random.Generator, sample_rate: int = 16000,
                   window_s: float = 1.0) -> np.ndarray:
    """One generated clip of class ``label`` (an index into
    :data:`~trt_exit.models.audio_vit.SYNTHETIC_AUDIO_CLASSES`), float32 in [-1, 1]."""
    samples = int(round(sample_rate * window_s))
    t = np.arange(samples) / sample_rate
    clip = np.zeros(samples)
    level = 10 ** (rng.uniform(-20, -6) / 20)

    def event(duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        onset = rng.uniform(0, window_s - duration_s)
        local = t - onset
        inside = (local >= 0) & (local < duration_s)
        fade = np.clip(np.minimum(local, duration_s - local) / 0.01, 0.0, 1.0) * inside
        return local, fade

    if label in (0, 1):
        f0 = rng.uniform(150, 500) if label == 0 else rng.uniform(1500, 4000)
        local, fade = event(rng.uniform(0.25, 0.7))
        clip = fade * np.sin(2 * np.pi * f0 * local + rng.uniform(0, 2 * np.pi))
    elif label in (2, 3):
        low, high = rng.uniform(300, 800), rng.uniform(2000, 4000)
        start, end = (low, high) if label == 2 else (high, low)
        duration = rng.uniform(0.3, 0.7)
        local, fade = event(duration)
        phase = 2 * np.pi * (start * local + 0.5 * (end - start) / duration * local**2)
        clip = fade * np.sin(phase)
    elif label == 4:
        _, fade = event(rng.uniform(0.15, 0.5))
        clip = fade * rng.standard_normal(samples) * 0.4
    elif label == 5:
        f0 = rng.uniform(800, 1500)
        for onset in np.sort(rng.uniform(0, window_s - 0.03, rng.integers(3, 7))):
            local = t - onset
            envelope = np.sin(np.pi * np.clip(local / 0.03, 0.0, 1.0))  # 0 outside the click
            clip = clip + envelope * np.sin(2 * np.pi * f0 * local)
    else:
        raise ConfigError(f"synthetic audio has 6 classes; got label {label}")
    noise = 10 ** (rng.uniform(-55, -35) / 20) * rng.standard_normal(samples)
    return np.clip(level * clip + noise, -1.0, 1.0).astype(np.float32)


def load_synthetic_audio(seed: int = 0, per_class: tuple[int, int, int] = (200, 50, 50),
                         preprocessing: dict[str, Any] | None = None) -> dict[str, Dataset]:
    """The generated six-class audio set (see the module docstring), as log-mel features.

    Args:
        seed: Seed of every split.
        per_class: Clips per class in train, val and test (default 1,200 / 300 / 300 clips).
        preprocessing: The model's preprocessing (default: ``{"audio": AUDIO_LOG_MEL}``).
    """
    from trt_exit.models.audio_vit import SYNTHETIC_AUDIO_CLASSES
    from trt_exit.pipelines.audio_features import log_mel

    mel = _log_mel_config(preprocessing)
    classes = len(SYNTHETIC_AUDIO_CLASSES)
    out = {}
    for index, (split, count) in enumerate(zip(SPLITS, per_class)):
        size = int(count) * classes
        labels = np.arange(size, dtype=np.int64) % classes
        clips = np.stack([synthetic_clip(int(label), np.random.default_rng([seed, index, i]),
                                         mel.sample_rate, mel.window_s)
                          for i, label in enumerate(labels)]) if size else \
            np.empty((0, mel.window_samples), np.float32)
        features = log_mel(clips, mel) if size else np.empty((0, *mel.shape), np.float32)
        out[split] = Dataset({tn.AUDIO: features}, labels, "classification",
                             f"synthetic_audio/{split}",
                             {"source": "trt_exit.training.audio_datasets.synthetic_clip",
                              "classes": list(SYNTHETIC_AUDIO_CLASSES), "seed": seed,
                              "per_class": int(count)})
    return out


register_dataset("speech_commands", load_speech_commands)
register_dataset("synthetic_audio", load_synthetic_audio)
