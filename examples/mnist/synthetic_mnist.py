"""Deterministic, learnable MNIST-shaped data, written as real IDX files.

For offline machines: each digit is a seven-segment glyph (its own template), drawn with random
stroke thickness, a jitter of a few pixels and noise, then written in MNIST's IDX format under
``<root>/MNIST/raw`` so that ``torchvision.datasets.MNIST(root, download=False)`` reads it through
the very same code path as the real data set.
"""

from __future__ import annotations

import os
import struct

import numpy as np

__all__ = ["write_synthetic_mnist", "FILES"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Segments: top, top-right, bottom-right, bottom, bottom-left, top-left, middle.
_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
    5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcfgd",
}  # fmt: skip


def _glyph(digit: int, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((28, 28), dtype=np.float32)
    t = int(rng.integers(2, 4))  # stroke thickness
    left, right, top, mid, bottom = 8, 19, 5, 13, 22
    boxes = {
        "a": (top, top + t, left, right + 1),
        "b": (top, mid + 1, right - t + 1, right + 1),
        "c": (mid, bottom + 1, right - t + 1, right + 1),
        "d": (bottom - t + 1, bottom + 1, left, right + 1),
        "e": (mid, bottom + 1, left, left + t),
        "f": (top, mid + 1, left, left + t),
        "g": (mid - t // 2, mid - t // 2 + t, left, right + 1),
    }
    for seg in _SEGMENTS[digit]:
        r0, r1, c0, c1 = boxes[seg]
        img[r0:r1, c0:c1] = 1.0
    dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
    img = np.roll(np.roll(img, dy, axis=0), dx, axis=1)
    img = img * rng.uniform(0.7, 1.0) + rng.normal(0.0, 0.15, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _write_idx(path: str, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(header + payload)
    os.replace(tmp, path)


def has_synthetic_mnist(root: str) -> bool:
    """All four IDX files are there (a process interrupted while writing them leaves only some:
    each file is written atomically, the set is not)."""
    raw = os.path.join(root, "MNIST", "raw")
    return all(os.path.exists(os.path.join(raw, name)) for name in FILES.values())


def write_synthetic_mnist(root: str, n_train: int = 6000, n_test: int = 1000, seed: int = 0) -> str:
    """Write the four IDX files under ``root/MNIST/raw``; returns that folder. Idempotent."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.stack([_glyph(int(d), rng) for d in labels]) if n else np.zeros((0, 28, 28), np.uint8)
        _write_idx(os.path.join(raw, FILES[f"{split}_images"]), 2051, (n, 28, 28), images.tobytes())
        _write_idx(os.path.join(raw, FILES[f"{split}_labels"]), 2049, (n,), labels.tobytes())
    return raw
