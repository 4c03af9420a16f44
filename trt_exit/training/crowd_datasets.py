"""Crowd-counting datasets with sound: the generated ``synthetic_av_crowd`` set and DISCO.

Both give splits of :class:`~trt_exit.training.datasets.Dataset` with inputs
``{"image": (N, 3, H, W), "audio": (N, 1, n_mels, frames)}`` float32, preprocessed by the very
functions the live pipeline uses (:func:`~trt_exit.pipelines.preprocess.image_to_input` and
:func:`~trt_exit.pipelines.audio_features.log_mel`, with the model's ``preprocessing``), and
targets (N, 1) float32 people counts.

``synthetic_av_crowd`` (:func:`load_synthetic_av_crowd`): scenes from
:func:`trt_exit.training.crowd_synth.render_scene`. Each split has its own plan (a count drawn
uniformly from 0..max_count and a degradation per sample: clean with probability
``1 - degraded_fraction``, else dark, blur or occluded with equal chances), drawn from
``numpy.random.default_rng([seed, split])``; sample ``i`` is rendered from
``default_rng([seed, split, i])``. So a split is the same on every machine, any sample can be
regenerated alone, and :func:`plan_scenes` tells the degradation of every sample without
rendering anything. Default sizes 1,600 / 400 / 600 (train / val / test), half of them degraded.

DISCO (:func:`load_disco`, Hu et al. 2020, CC BY 4.0): 1,935 images (1920x1080) each with the
1 s of audio recorded around it and head annotations, split 1,435 / 200 / 300. Layout read
(our convention; arrange a download like this, or pass the folder names)::

    root/
      train/  val/  test/            one folder per split
        <name>.jpg | .png            the image
        <name>.wav                   its 1 s of audio (any rate; resampled to 16 kHz)
        <name>.npy | <name>.json |   the annotation: an (K, 2) array of head positions, a JSON
        <name>.txt | <name>.mat      list of [x, y] (or {"count": n}), a text file with one
                                     "x y" per line, or a MATLAB file with such an array
                                     (scipy.io.loadmat, first 2-column array found)

The count is the number of annotated heads. Images are resized to the model's input size with
area interpolation (DISCO's 16:9 frames are squeezed to the model's aspect ratio).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.training.crowd_synth import DEGRADATIONS, CrowdSceneConfig, render_scene
from trt_exit.training.datasets import Dataset, register_dataset

SPLITS = ("train", "val", "test")
#: Default split sizes of ``synthetic_av_crowd`` (train, val, test).
SYNTHETIC_SIZES = (1600, 400, 600)


def _preprocessing(preprocessing: dict[str, Any] | None) -> tuple[dict[str, Any], Any]:
    """The image spec and the :class:`LogMelConfig` of ``preprocessing`` (default: the
    crowd models')."""
    from trt_exit.pipelines.audio_features import LogMelConfig

    if preprocessing is None:
        from trt_exit.models.audiovisual import av_crowd_preprocessing

        preprocessing = av_crowd_preprocessing()
    if "image" not in preprocessing or "audio" not in preprocessing:
        raise ConfigError("crowd datasets need preprocessing with 'image' and 'audio' entries "
                          "(see trt_exit.models.audiovisual.av_crowd_preprocessing)")
    return preprocessing["image"], LogMelConfig.from_dict(preprocessing["audio"])


@dataclass(frozen=True)
class ScenePlan:
    """What a split of ``synthetic_av_crowd`` holds, sample by sample.

    Attributes:
        counts: (N,) int64 people per scene.
        degradations: Per scene: None (clean) or one of :data:`DEGRADATIONS`.
    """

    counts: np.ndarray
    degradations: tuple[str | None, ...]

    def degradation_labels(self) -> np.ndarray:
        """(N,) str array: ``"clean"`` or the degradation."""
        return np.array([d or "clean" for d in self.degradations])


def plan_scenes(seed: int, split: str, size: int, degraded_fraction: float = 0.5,
                max_count: int = CrowdSceneConfig().max_count) -> ScenePlan:
    """The counts and degradations of a ``synthetic_av_crowd`` split, without rendering.

    Args:
        seed: Dataset seed.
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: Samples in the split.
        degraded_fraction: Probability that a scene is degraded.
        max_count: Largest count.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0.0 <= degraded_fraction <= 1.0:
        raise ConfigError(f"degraded_fraction must be in [0, 1], got {degraded_fraction}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    counts = rng.integers(0, max_count + 1, size)
    degraded = rng.random(size) < degraded_fraction
    kinds = rng.integers(0, len(DEGRADATIONS), size)
    return ScenePlan(counts.astype(np.int64),
                     tuple(DEGRADATIONS[k] if d else None for d, k in zip(degraded, kinds)))


@lru_cache(maxsize=8)
def _render_split(seed: int, split: str, size: int, degraded_fraction: float,
                  scene: CrowdSceneConfig, preprocessing_json: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from trt_exit.pipelines.audio_features import log_mel
    from trt_exit.pipelines.preprocess import image_to_input

    image_spec, mel = _preprocessing(json.loads(preprocessing_json))
    plan = plan_scenes(seed, split, size, degraded_fraction, scene.max_count)
    height, width = image_spec["size"]
    images = np.empty((size, 3, height, width), np.float32)
    waves = np.empty((size, scene.window_samples), np.float32)
    for i, (count, degradation) in enumerate(zip(plan.counts, plan.degradations)):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        image, audio = render_scene(int(count), rng, scene, degradation)
        images[i] = image_to_input(image, image_spec)
        waves[i] = audio
    audio = log_mel(waves, mel, scene.sample_rate) if size else np.empty((0, *mel.shape), np.float32)
    targets = plan.counts.astype(np.float32).reshape(-1, 1)
    return images, audio, targets


def load_synthetic_av_crowd(seed: int = 0, train: int = SYNTHETIC_SIZES[0],
                            val: int = SYNTHETIC_SIZES[1], test: int = SYNTHETIC_SIZES[2],
                            degraded_fraction: float = 0.5,
                            scene: CrowdSceneConfig | None = None,
                            preprocessing: dict[str, Any] | None = None) -> dict[str, Dataset]:
    """Generated crowd scenes with sound, split into train / val / test.

    Args:
        seed: Seed of every split (see the module docstring for how samples are drawn).
        train: Training samples.
        val: Validation samples.
        test: Test samples.
        degraded_fraction: Probability that a scene's image is degraded.
        scene: Scene settings (default :class:`CrowdSceneConfig`).
        preprocessing: The model's ``{"image": spec, "audio": log-mel dict}`` (default: the
            crowd models' :func:`~trt_exit.models.audiovisual.av_crowd_preprocessing`).

    Returns:
        ``{"train", "val", "test"}`` regression datasets; targets (N, 1) counts. Splits are
        cached per process (generating 2,600 scenes takes about 25 s on one core): loads with
        the same arguments share their arrays, so do not modify them in place.
    """
    scene = scene or CrowdSceneConfig()
    image_spec, mel = _preprocessing(preprocessing)
    key = json.dumps({"image": image_spec, "audio": mel.to_dict()}, sort_keys=True)
    info = {"source": "trt_exit.training.crowd_synth.render_scene", "seed": seed,
            "degraded_fraction": degraded_fraction, "degradations": list(DEGRADATIONS),
            "max_count": scene.max_count,
            "split": "per-split plans from default_rng([seed, split]); sample i from "
                     "default_rng([seed, split, i])"}
    out = {}
    for split, size in zip(SPLITS, (train, val, test)):
        if size < 0:
            raise ConfigError(f"split {split} cannot have {size} samples")
        images, audio, targets = _render_split(seed, split, int(size), float(degraded_fraction),
                                               scene, key)
        out[split] = Dataset({tn.IMAGE: images, tn.AUDIO: audio}, targets, "regression",
                             f"synthetic_av_crowd/{split}", dict(info, samples=int(size)))
    return out


# --------------------------------------------------------------------------- DISCO

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ANNOTATION_SUFFIXES = (".npy", ".json", ".txt", ".mat")


def read_head_count(path: Path) -> int:
    """Number of annotated heads in a DISCO-style annotation file (see the module docstring)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            points = np.load(path, allow_pickle=False)
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                if "count" in data:
                    return int(data["count"])
                data = data.get("points", data.get("heads", []))
            points = np.asarray(data, dtype=np.float64).reshape(-1, 2)
        elif suffix == ".txt":
            points = np.loadtxt(path, ndmin=2)
        elif suffix == ".mat":
            from scipy.io import loadmat

            arrays = [v for k, v in loadmat(str(path)).items()
                      if not k.startswith("__") and isinstance(v, np.ndarray)]
            points = next((a for a in _flatten_mat(arrays) if a.ndim == 2 and a.shape[1] == 2),
                          None)
            if points is None:
                raise ArtifactError(f"{path}: no (K, 2) array of head positions found")
        else:
            raise ArtifactError(f"{path}: unsupported annotation format {suffix}")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the annotation {path}: {exc}") from exc
    points = np.asarray(points)
    if points.size == 0:
        return 0
    if points.ndim != 2 or points.shape[1] < 2:
        raise ArtifactError(f"{path}: expected (K, 2) head positions, got shape {points.shape}")
    return int(points.shape[0])


def _flatten_mat(arrays: list[np.ndarray]):
    """Numeric arrays inside MATLAB structs / cell arrays, depth first."""
    for array in arrays:
        if array.dtype == object or array.dtype.names:
            inner = ([array[name] for name in array.dtype.names] if array.dtype.names
                     else list(array.ravel()))
            yield from _flatten_mat([np.asarray(a) for a in inner])
        elif np.issubdtype(array.dtype, np.number):
            yield array


def _find(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_disco(seed: int = 0, root: str | None = None, splits: tuple[str, str, str] = SPLITS,
               preprocessing: dict[str, Any] | None = None, limit: int | None = None) -> dict[str, Dataset]:
    """DISCO (or any folder in its layout, see the module docstring), preprocessed.

    Args:
        seed: Unused (the split is DISCO's own); kept for the loader interface.
        root: The dataset folder.
        splits: Folder names of the train, val and test splits.
        preprocessing: The model's ``{"image": spec, "audio": log-mel dict}`` (default: the
            crowd models').
        limit: Read at most this many samples per split (sorted by name), for quick runs.

    Returns:
        ``{"train", "val", "test"}`` regression datasets; targets (N, 1) head counts.
    """
    from trt_exit.pipelines.audio_features import log_mel
    from trt_exit.pipelines.preprocess import image_to_input
    from trt_exit.training.audio_datasets import read_wav

    if root is None:
        raise ConfigError("the disco dataset needs its folder: pass root=PATH "
                          "(dataset_options={'root': PATH})")
    root_path = Path(root)
    image_spec, mel = _preprocessing(preprocessing)
    out = {}
    for name, folder_name in zip(SPLITS, splits):
        folder = root_path / folder_name
        if not folder.is_dir():
            raise ArtifactError(f"DISCO split folder {folder} does not exist; expected "
                                f"{root_path}/{{{','.join(splits)}}}/ with <name>.jpg, <name>.wav "
                                f"and an annotation per sample")
        stems = sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if limit is not None:
            stems = stems[:limit]
        if not stems:
            raise ArtifactError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {folder}")
        images, features, counts = [], [], []
        for stem in stems:
            image_path = _find(folder, stem, _IMAGE_SUFFIXES)
            wav_path = _find(folder, stem, (".wav",))
            label_path = _find(folder, stem, _ANNOTATION_SUFFIXES)
            if wav_path is None or label_path is None:
                raise ArtifactError(f"{folder}: sample {stem!r} lacks its "
                                    f"{'audio (.wav)' if wav_path is None else 'annotation'}")
            images.append(image_to_input(_read_image(image_path), image_spec))
            samples, rate = read_wav(wav_path)
            features.append(log_mel(samples, mel, rate))
            counts.append(read_head_count(label_path))
        out[name] = Dataset(
            {tn.IMAGE: np.stack(images), tn.AUDIO: np.stack(features)},
            np.asarray(counts, np.float32).reshape(-1, 1), "regression", f"disco/{name}",
            {"source": "DISCO (Hu et al. 2020), CC BY 4.0", "root": str(root_path),
             "split": f"the dataset's own {folder_name}/ folder", "samples": len(stems)})
    return out


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as handle:
            return np.asarray(handle.convert("RGB"))
    except OSError as exc:
        raise ArtifactError(f"cannot read the image {path}: {exc}") from exc


register_dataset("synthetic_av_crowd", load_synthetic_av_crowd)
register_dataset("disco", load_disco)
