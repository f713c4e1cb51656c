"""Helpers for the Phase 1 tests: tiny HF encoders, a mixed-media manifest, a factory.

Nothing is downloaded: the encoders are random-init from configs, saved with
save_pretrained; the media are the demo dataset's, re-encoded at other sizes, modes,
sample rates, channel counts and PCM widths, with some rows lacking a modality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from PIL import Image
from torch import nn

from trainer.phase1.random_parts import (
    build_aligner,
    build_audio_encoder,
    build_image_encoder,
    build_text_encoder,
)

ALIGN_DIM = 16

# (image mode and size or None, audio rate, subtype, channels or None): row i uses i % 6
VARIANTS = [
    (("RGBA", (50, 37), "PNG"), (16000, "PCM_24", 2)),
    (("L", (64, 64), "JPEG"), (8000, "PCM_U8", 1)),
    (("RGB", (32, 32), "PNG"), None),  # image only
    (None, (44100, "FLOAT", 2)),  # audio only
    (("P", (24, 40), "PNG"), (22050, "PCM_32", 1)),
    (("RGB", (32, 32), "PNG"), (8000, "PCM_16", 1)),
]


def hf_parts(root: Path) -> dict[str, Path]:
    """CLIP vision tower, Whisper, BERT and an aligner, tiny; built once under `root`."""
    parts = {"image": root / "clip", "audio": root / "whisper", "text": root / "bert",
             "aligner": root / "aligner.safetensors"}
    if not parts["aligner"].is_file():
        build_image_encoder(parts["image"], "clip")
        build_audio_encoder(parts["audio"], "whisper")
        build_text_encoder(parts["text"])
        build_aligner(parts["aligner"], {"image": 32, "audio": 32, "text": 32}, ALIGN_DIM)
    return parts


def hf_phase1(parts: dict[str, Path]) -> dict:
    """A `phase1:` section of source hf over `parts`."""
    return {"source": "hf", "image": {"path": str(parts["image"]), "tokens": 4},
            "audio": {"path": str(parts["audio"]), "frames_per_token": 10},
            "text": {"path": str(parts["text"]), "pooling": "mean"},
            "aligner_path": str(parts["aligner"])}


def mixed_manifest(demo_manifest: Path, out: Path, count: int = 24) -> Path:
    """The demo's first `count` rows with their media re-encoded per VARIANTS."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in demo_manifest.read_text().splitlines()][:count]
    lines = []
    for i, row in enumerate(rows):
        image, audio = VARIANTS[i % len(VARIANTS)]
        line = {"id": row["id"], "prompt": row["prompt"], "target": row["target"]}
        if image is not None:
            mode, size, fmt = image
            src = Image.open(demo_manifest.parent / row["image"]).convert("RGB").resize(size)
            name = f"img{i}.{fmt.lower().replace('jpeg', 'jpg')}"
            (src.convert("L") if mode == "L" else src.convert(mode)).save(out / name, fmt)
            line["image"] = name
        if audio is not None:
            rate, subtype, channels = audio
            x, sr = soundfile.read(demo_manifest.parent / row["audio"], dtype="float32")
            y = soxr.resample(x, sr, rate)
            y = np.stack([y, 0.5 * y], axis=1) if channels == 2 else y
            name = f"clip{i}.wav"
            soundfile.write(out / name, y, rate, subtype=subtype)
            line["audio"] = name
        lines.append(json.dumps(line))
    path = out / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class TinyPhase1(nn.Module):
    """A factory-built Phase 1 (the contract of trainer.phase1.contract): image colour
    statistics and audio frame energies, each through a linear map; `tokens` per image,
    one token per 0.05 s of audio."""

    def __init__(self, align_dim: int, tokens: int) -> None:
        super().__init__()
        self.align_dim, self.sample_rate, self.tokens = align_dim, 8000, tokens
        self.image = nn.Linear(6, align_dim)
        self.audio = nn.Linear(2, align_dim)

    def forward(self, batch):
        dev = self.image.weight.device
        rows = []
        for im, clip in zip(batch.images, batch.audio, strict=True):
            parts = []
            if im is not None:
                px = torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32) / 255)
                stats = torch.cat([px.mean((0, 1)), px.std((0, 1))]).to(dev)
                parts.append(self.image(stats).expand(self.tokens, -1)
                             + torch.arange(self.tokens, device=dev)[:, None] * 0.1)
            if clip is not None:
                frames = torch.from_numpy(clip).to(dev).split(400)
                feats = torch.stack([torch.stack([f.abs().mean(), f.std(unbiased=False)])
                                     for f in frames])
                parts.append(self.audio(feats))
            rows.append(torch.cat(parts))
        length = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), length, self.align_dim, device=dev)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            out[i, : len(r)], mask[i, : len(r)] = r, True
        return out, mask


def build(align_dim: int = ALIGN_DIM, tokens: int = 3, seed: int = 0) -> nn.Module:
    """The factory: `phase1.factory: "phase1_parts:build"`."""
    torch.manual_seed(seed)
    return TinyPhase1(align_dim, tokens)
