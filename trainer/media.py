"""Reading media files: images through Pillow, audio through libsndfile + soxr.

Images of any size and mode come back as RGB `PIL.Image`s (each Phase 1 resizes and
normalises them with its own processor). Audio of any sample rate, channel count and
PCM width (8/16/24/32-bit integer, 32/64-bit float; WAV, FLAC, OGG, ... whatever
libsndfile reads) comes back as mono float32 in [-1, 1] at the rate the Phase 1 asks
for, resampled by soxr. A file that cannot be read raises `MediaError` naming it; the
data layer adds the manifest line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr
from PIL import Image, UnidentifiedImageError


class MediaError(ValueError):
    """A media file that cannot be read; the message names the file and why."""


def read_image(path: Path) -> Image.Image:
    """An RGB image, fully decoded (a truncated file fails here, not later)."""
    try:
        with Image.open(path) as im:
            im.load()
            # Palette and alpha images: convert() composites nothing, it drops alpha; what
            # every HF image processor expects is plain RGB.
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError,
            SyntaxError) as e:  # Pillow raises SyntaxError for some broken headers
        raise MediaError(f"cannot read image {path}: {_reason(e)}") from None


def read_audio(path: Path, sample_rate: int | None) -> np.ndarray:
    """Mono float32 samples of an audio file at `sample_rate` (channels averaged);
    None keeps the file's own rate (to check that a file reads)."""
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise MediaError(f"cannot read audio {path}: {_reason(e)}") from None
    if data.shape[0] == 0:
        raise MediaError(f"cannot read audio {path}: it holds no samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
