"""Image preprocessing shared by training and the live pipelines.

An image spec lives in the manifest's ``preprocessing["image"]``::

    {"size": [H, W], "color": "RGB", "scale": 1/255, "mean": [..3], "std": [..3],
     "layout": "NCHW float32"}

:func:`image_to_input` turns one HxWx3 uint8 frame (RGB, or BGR as OpenCV delivers it) into the
model's (3, H, W) float32 input: resize (area interpolation when shrinking), convert the colour
order, scale, normalize.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trt_exit.errors import InputError


def default_image_spec(height: int, width: int) -> dict[str, Any]:
    """ImageNet-style normalization at ``height`` x ``width``."""
    return {"size": [int(height), int(width)], "color": "RGB", "scale": 1.0 / 255.0,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "layout": "NCHW float32"}


def resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes an HxWxC uint8 frame (OpenCV when installed, else Pillow)."""
    if frame.shape[:2] == (height, width):
        return frame
    try:
        import cv2

        shrinking = frame.shape[0] > height or frame.shape[1] > width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(frame, (width, height), interpolation=interpolation)
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


def image_to_input(frame: np.ndarray, spec: dict[str, Any], bgr: bool = False) -> np.ndarray:
    """One frame to the model's image input.

    Args:
        frame: (H, W, 3) uint8 image.
        spec: The manifest's ``preprocessing["image"]``.
        bgr: The frame is in OpenCV's BGR order.

    Returns:
        (3, H', W') float32 at the spec's size.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise InputError(f"expected an (H, W, 3) uint8 frame, got {frame.shape} {frame.dtype}")
    height, width = spec["size"]
    image = resize(frame, height, width)
    if bgr:
        image = image[:, :, ::-1]
    x = image.astype(np.float32) * float(spec.get("scale", 1.0 / 255.0))
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
