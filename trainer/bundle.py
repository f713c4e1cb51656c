"""The Phase 1 bundle: frozen image/audio/text encoders and the aligner.

On disk a bundle is a directory with `phase1_config.json` (format tag and the
module sizes) and `model.safetensors` (all weights, prefixed by module name).
Loading builds the modules from the config, loads the weights strictly, and
freezes everything (no grads, eval mode) in one place, asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.config import DemoBundle, EncoderSpec

BUNDLE_FORMAT = "phase2-tune/phase1-bundle"
BUNDLE_VERSION = 1
CONFIG_FILE = "phase1_config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_VOCAB = 257  # bytes + padding id 256


class _TokenEncoder(nn.Module):
    """Learned positions + a pre-norm transformer over a token sequence."""

    def __init__(self, spec: EncoderSpec, num_tokens: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, spec.dim))
        layer = nn.TransformerEncoderLayer(
            spec.dim, spec.heads, int(spec.dim * spec.mlp_ratio), dropout=0.0,
            batch_first=True, norm_first=True,
        )
        # enable_nested_tensor=False: the fast path changes numerics between batch sizes,
        # and the feature cache must match running the encoders exactly.
        self.blocks = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.blocks(x + self.pos[:, : x.shape[1]], src_key_padding_mask=pad_mask))


class ImageEncoder(nn.Module):
    def __init__(self, spec: DemoBundle) -> None:
        super().__init__()
        s = spec.image
        self.patch = nn.Conv2d(3, s.dim, spec.patch_size, stride=spec.patch_size)
        self.encoder = _TokenEncoder(s, (spec.image_size // spec.patch_size) ** 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,N,D]
        return self.encoder(self.patch(images).flatten(2).transpose(1, 2))


class AudioEncoder(nn.Module):
    def __init__(self, spec: DemoBundle) -> None:
        super().__init__()
        self.frame_size = spec.frame_size
        self.frame = nn.Linear(spec.frame_size, spec.audio.dim)
        self.encoder = _TokenEncoder(spec.audio, spec.audio_samples // spec.frame_size)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # [B,T] -> [B,T/frame,D]
        frames = audio.reshape(audio.shape[0], -1, self.frame_size)
        return self.encoder(self.frame(frames))


class TextEncoder(nn.Module):
    """Byte-level text encoder, mean-pooled to one token."""

    def __init__(self, spec: DemoBundle) -> None:
        super().__init__()
        self.embed = nn.Embedding(TEXT_VOCAB, spec.text.dim, padding_idx=TEXT_VOCAB - 1)
        self.encoder = _TokenEncoder(spec.text, spec.text_max_len)

    def forward(self, text: torch.Tensor) -> torch.Tensor:  # [B,L] byte ids -> [B,1,D]
        pad = text == TEXT_VOCAB - 1
        h = self.encoder(self.embed(text), pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return ((h * keep).sum(1) / keep.sum(1).clamp(min=1)).unsqueeze(1)


class Aligner(nn.Module):
    """Maps each modality into the shared aligned space (trained in Phase 1)."""

    def __init__(self, spec: DemoBundle) -> None:
        super().__init__()

        def head(dim: int) -> nn.Module:
            if spec.aligner_hidden is None:
                return nn.Sequential(nn.Linear(dim, spec.align_dim), nn.LayerNorm(spec.align_dim))
            return nn.Sequential(nn.Linear(dim, spec.aligner_hidden), nn.GELU(),
                                 nn.Linear(spec.aligner_hidden, spec.align_dim),
                                 nn.LayerNorm(spec.align_dim))

        self.image = head(spec.image.dim)
        self.audio = head(spec.audio.dim)
        self.text = head(spec.text.dim)


class Phase1Bundle(nn.Module):
    """Frozen encoders + aligner: raw inputs -> aligned feature tokens [B, T, align_dim]."""

    def __init__(self, spec: DemoBundle) -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = ImageEncoder(spec)
        self.audio_encoder = AudioEncoder(spec)
        self.text_encoder = TextEncoder(spec)
        self.aligner = Aligner(spec)

    @property
    def num_tokens(self) -> int:
        s = self.spec
        return (s.image_size // s.patch_size) ** 2 + s.audio_samples // s.frame_size + 1

    @property
    def align_dim(self) -> int:
        return self.spec.align_dim

    def forward(self, images: torch.Tensor, audio: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.aligner.image(self.image_encoder(images)),
            self.aligner.audio(self.audio_encoder(audio)),
            self.aligner.text(self.text_encoder(text)),
        ], dim=1)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a module for good: no grads, eval mode; asserted."""
    module.requires_grad_(False)
    module.eval()
    assert not any(p.requires_grad for p in module.parameters()), "frozen module has grads"
    assert not any(m.training for m in module.modules()), "frozen module in train mode"
    return module


def write_bundle(bundle: Phase1Bundle, directory: Path) -> None:
    """Write a bundle's config and weights into an existing directory."""
    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
            "spec": bundle.spec.model_dump(mode="json")}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    save_file({k: v.contiguous() for k, v in bundle.state_dict().items()},
              str(directory / WEIGHTS_FILE))


def read_spec(directory: Path) -> DemoBundle:
    meta_path = Path(directory) / CONFIG_FILE
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != BUNDLE_FORMAT or meta.get("version") != BUNDLE_VERSION:
        raise ValueError(f"{meta_path}: not a {BUNDLE_FORMAT} v{BUNDLE_VERSION} bundle")
    return DemoBundle.model_validate(meta["spec"])


def load_bundle(directory: Path, device: torch.device | str = "cpu") -> Phase1Bundle:
    """Load a bundle from disk (safetensors only) and freeze it."""
    directory = Path(directory)
    bundle = Phase1Bundle(read_spec(directory))
    bundle.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return freeze(bundle.to(device))


def build_demo_bundle(spec: DemoBundle, directory: Path, seed: int = 0) -> None:
    """Random-init bundle in the real format, for running with nothing downloaded."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        bundle = Phase1Bundle(spec)
    write_bundle(bundle, directory)
