"""Image files as model inputs: what ``trt-exit run --input`` and ``trt-exit eval --data`` read.

Sources (:func:`gather`): image files; folders (every image under them, sorted by path); and
``imagefolder://DIR`` or ``imagefolder://FILE.csv|.jsonl`` (every image it holds, with its class
or value, as ``train --data`` reads it). Every image is decoded and transformed exactly as the
model's validation and test splits were (:func:`~trt_exit.training.image_folder.decode_image`
and timm's evaluation transform of the data config recorded with the model), and the transform
timm builds now is checked against the one the manifest recorded (:func:`model_transform`), so
``run`` on an image file gives the prediction ``eval`` gives on that image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, InputError
from trt_exit.training.datasets import Dataset
from trt_exit.training.image_folder import (
    SCHEME,
    SPLITS,
    ImageFolderSplit,
    ImageList,
    image_extensions,
    create_transform,
    data_path,
    describe_transform,
    find_images,
    recorded_data_config,
)


def model_transform(manifest: Any) -> dict[str, Any]:
    """The data config the model's images are transformed with, after checking that timm builds
    from it the evaluation transform the manifest recorded (when it recorded one).

    Raises:
        ConfigError: The model takes other inputs than one image, records no data config, or
            this timm builds another transform.
    """
    specs = [(spec.name, list(spec.shape)) for spec in manifest.inputs]
    config = recorded_data_config(manifest)
    expected = [(tn.IMAGE, [-1, *config["input_size"]])]
    if specs != expected:
        raise ConfigError(f"{manifest.path}: the model takes {specs}, not one image "
                          f"{expected[0][1]}; give preprocessed arrays (.npy / .npz)")
    recorded = manifest.preprocessing.get("eval_transform")
    if recorded is not None:
        built = describe_transform(create_transform(config, training=False))
        if built != recorded:
            import timm

            step = next((b, r) for b, r in zip(built + [None] * len(recorded),
                                               recorded + [None] * len(built)) if b != r)
            raise ConfigError(
                f"timm {timm.__version__} builds another evaluation transform from "
                f"{manifest.path}'s data config than the one recorded with timm "
                f"{manifest.preprocessing.get('timm', '?')} (step {step[1]} became {step[0]}); "
                f"install that timm version, or preprocess the images as the manifest's "
                f"preprocessing.formula says and give arrays")
    return config


def _check_headers(paths: Sequence[str]) -> None:
    """Every file opens as an image (Pillow reads the header only): a file that is not one is
    an error before any result is written."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputError(f"{path} is not an image Pillow can read ({exc}); remove it or "
                             f"give other files") from exc


def gather(sources: Sequence[str], seed: int = 0) -> tuple[ImageList, list[Any] | None]:
    """The image files of ``sources`` (see the module docstring) and, when every source is an
    ``imagefolder://`` one, each image's label (class name or value).

    Raises:
        InputError: A source that does not exist, is not an image, or holds no image.
    """
    extensions = image_extensions()
    paths: list[str] = []
    labels: list[Any] = []
    labelled = all(s.startswith(SCHEME) for s in sources)
    for source in sources:
        if source.startswith(SCHEME):
            root = data_path(source)
            lists, task, classes, _ = find_images(root, seed)
            pairs = sorted((p, t) for s in SPLITS if s in lists
                           for p, t in zip(lists[s].paths, lists[s].targets.tolist()))
            paths.extend(p for p, _ in pairs)
            labels.extend(classes[t] if classes else t[0] for _, t in pairs)
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise InputError(f"{path} holds no images ({', '.join(sorted(extensions))})")
            paths.extend(found)
        elif path.is_file() and path.suffix.lower() in extensions:
            paths.append(str(path))
        elif not path.exists():
            raise InputError(f"{path} does not exist")
        else:
            raise InputError(f"{path} is not an image ({', '.join(sorted(extensions))}), a "
                             f"folder of images or imagefolder://DIR; arrays come as one .npy "
                             f"or .npz file")
    _check_headers(paths)
    return ImageList(paths, np.zeros(len(paths), dtype=np.int64)), (labels if labelled else None)


def image_batches(manifest: Any, images: ImageList, batch: int, num_workers: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(inputs (B, 3, H, W) float32, their indices in images)`` in order, transformed
    as the model's evaluation split was.

    Raises:
        InputError: An image that cannot be decoded (named; nothing after it is yielded).
    """
    config = model_transform(manifest)
    split = ImageFolderSplit(images, config, "classification", "images", training=False,
                             num_workers=num_workers if len(images) > batch else 0)
    done = 0
    for array, _, indices in split.decoded(batch, training=False, strict=False):
        if split.skipped:
            break
        done += len(indices)
        yield array.numpy().astype(np.float32), np.asarray(indices)
    if split.skipped:
        raise InputError(f"{sorted(split.skipped)[0]} could not be decoded (a truncated or "
                         f"damaged image; {done} earlier images had run); remove or replace it")


def labelled_images(manifest: Any, source: str, split: str | None = None,
                    num_workers: int = 2) -> Dataset:
    """The images of ``source`` (``imagefolder://DIR|FILE``, or the folder / list itself) with
    their labels mapped onto the model's classes, decoded for evaluation: every image it holds,
    or one ``split`` of it (split as ``train --data`` splits it, with the model's seed).
    Undecodable images are skipped and counted (``info["skipped_images"]``).

    Raises:
        ConfigError: A source of another task, or classes the model does not know.
    """
    uri = source if source.startswith(SCHEME) else SCHEME + source
    root = data_path(uri)
    seed = int((manifest.model.get("dataset") or {}).get("seed", 0) or 0)
    lists, task, classes, rule = find_images(root, seed)
    if task != manifest.task:
        raise ConfigError(f"{root} holds {task} targets, but {manifest.name} is a "
                          f"{manifest.task} model")
    chosen = [split] if split else [s for s in SPLITS if s in lists]
    paths = [p for s in chosen for p in lists[s].paths]
    targets = np.concatenate([lists[s].targets for s in chosen])
    if task == "classification":
        names = manifest.model.get("class_names")
        if not names:
            raise ConfigError(f"{manifest.path} records no class names, so the folder's classes "
                              f"cannot be matched to the model's outputs; evaluate on its own "
                              f"dataset (trt-exit eval {manifest.root})")
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise ConfigError(f"{root} has classes {unknown[:5]} the model does not know; its "
                              f"classes are {names[:10]}{' ...' if len(names) > 10 else ''}")
        index = {name: names.index(name) for name in classes}
        targets = np.array([index[classes[t]] for t in targets], dtype=np.int64)
    name = f"imagefolder:{root.name}" + (f"/{split}" if split else "")
    stream = ImageFolderSplit(ImageList(paths, targets), model_transform(manifest), task, name,
                              {"source": str(root), "split": rule if split else "every image",
                               "images": len(paths)}, training=False, num_workers=num_workers)
    return stream.materialize()
