"""The text drawn on frames sent to video sinks: count, exit taken, latency and FPS."""

from __future__ import annotations

import numpy as np

from trt_exit.pipelines.opencv_support import import_cv2
from trt_exit.pipelines.sinks import FrameResult


def overlay_lines(result: FrameResult) -> list[str]:
    """The overlay's text, one string per line."""
    count = f"count {result.count:.1f}"
    if result.true_count is not None:
        count += f"  (true {result.true_count:.0f})"
    lines = [
        count,
        # 0-based like the JSONL records, the summary and the API: "exit 2/2" is the final head.
        f"exit {result.exit}/{result.num_exits - 1}  conf {result.confidence:.2f}",
        f"{result.latency_ms:.1f} ms  {result.fps:.1f} FPS",
    ]
    if result.audio_missing_ms > 0:
        lines.append(f"audio missing {result.audio_missing_ms:.0f} ms")
    return lines


def draw_overlay(image: np.ndarray, result: FrameResult, bgr: bool = True) -> np.ndarray:
    """A BGR copy of ``image`` with the overlay in the top-left corner.

    Args:
        image: (H, W, 3) uint8 frame.
        result: What to show.
        bgr: ``image`` is BGR (else RGB, converted).

    Returns:
        (H, W, 3) uint8 BGR.
    """
    cv2 = import_cv2()
    canvas = np.ascontiguousarray(image if bgr else image[:, :, ::-1])
    canvas = canvas.copy()
    height = canvas.shape[0]
    scale = max(0.35, height / 720.0 * 0.8)
    thickness = max(1, int(round(scale * 2)))
    lines = overlay_lines(result)
    sizes = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0] for t in lines]
    line_h = max(h for _, h in sizes) + int(10 * scale) + 2
    box_w = max(w for w, _ in sizes) + int(16 * scale) + 4
    box_h = line_h * len(lines) + int(8 * scale) + 2
    box_w, box_h = min(box_w, canvas.shape[1]), min(box_h, height)
    # Darken the box (50 %) so the text reads on any scene.
    canvas[:box_h, :box_w] = (canvas[:box_h, :box_w] // 2).astype(np.uint8)
    for i, text in enumerate(lines):
        y = (i + 1) * line_h
        cv2.putText(canvas, text, (int(8 * scale) + 2, y), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)
    return canvas
