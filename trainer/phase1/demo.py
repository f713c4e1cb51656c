"""The project's bundle format (and the demo bundle) behind the Phase 1 contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from trainer.bundle import load_bundle
from trainer.data import fit_samples, image_tensor, text_bytes
from trainer.phase1.contract import RawBatch, module_device


class BundlePhase1(nn.Module):
    """A bundle's encoders + aligner: fixed token blocks [image][audio][text].

    Preprocessing is the bundle's own (resize to image_size, [-1, 1]; audio resampled to
    the bundle's rate, cropped or zero-padded to audio_samples; prompt bytes). An example
    without an image (audio) has its image (audio) block masked out; the text block is
    real when the prompt is not empty.
    """

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.bundle = load_bundle(directory)
        spec = self.bundle.spec
        self.align_dim = spec.align_dim
        self.sample_rate = spec.sample_rate
        self.blocks = ((spec.image_size // spec.patch_size) ** 2,
                       spec.audio_samples // spec.frame_size, 1)

    def forward(self, batch: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        s, dev = self.bundle.spec, module_device(self)
        black = Image.new("RGB", (s.image_size, s.image_size))
        silence = np.zeros(0, dtype=np.float32)
        images = torch.stack([image_tensor(im if im is not None else black, s.image_size)
                              for im in batch.images])
        audio = torch.stack([fit_samples(a if a is not None else silence, s.audio_samples)
                             for a in batch.audio])
        text = torch.stack([text_bytes(t, s.text_max_len) for t in batch.texts])
        feats = self.bundle(images.to(dev), audio.to(dev), text.to(dev))
        present = torch.tensor([[im is not None, a is not None, bool(t)] for im, a, t in
                                zip(batch.images, batch.audio, batch.texts, strict=True)])
        mask = present.repeat_interleave(torch.tensor(self.blocks), dim=1)
        return feats, mask.to(feats.device)
