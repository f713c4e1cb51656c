"""Manifest reading, media loading, tokenization and batching.

Manifest: JSONL, one example per line:
    {"id": "...", "image": "images/0.png", "audio": "audio/0.wav",
     "prompt": "Describe ...", "target": "a red circle ..."}
Media paths are relative to the manifest's directory (absolute paths allowed).

Sequence layout fed to the LLM, per example:
    [projected feature tokens] [prompt tokens] [target tokens] </s> [pad ...]
Only target tokens and </s> carry labels; prefix, prompt and padding are -100.
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.bundle import TEXT_VOCAB
from trainer.config import DemoBundle
from trainer.errors import ConfigError, Problem

IGNORE_INDEX = -100
REQUIRED_KEYS = ("image", "audio", "prompt", "target")


@dataclass(frozen=True)
class Example:
    id: str
    image: Path
    audio: Path
    prompt: str
    target: str


def read_manifest(path: Path) -> list[Example]:
    """Parse a JSONL manifest; every bad line is reported with its line number."""
    problems, examples = [], []
    base = path.parent
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(Problem(where, "", f"invalid JSON: {e.msg}",
                                    "one JSON object per line"))
            continue
        missing = [k for k in REQUIRED_KEYS if not isinstance(obj.get(k), str)]
        if missing:
            problems.append(Problem(where, ",".join(missing), "missing or not a string",
                                    f"each line needs {', '.join(REQUIRED_KEYS)}"))
            continue
        image, audio = base / obj["image"], base / obj["audio"]
        for key, p in (("image", image), ("audio", audio)):
            if not p.is_file():
                problems.append(Problem(where, key, f"file {p} not found",
                                        "paths are relative to the manifest's directory"))
        examples.append(Example(str(obj.get("id", n)), image, audio, obj["prompt"], obj["target"]))
    if not examples and not problems:
        problems.append(Problem(str(path), "", "manifest is empty", "add examples"))
    if problems:
        raise ConfigError(problems[:20])
    return examples


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB image -> float tensor [3, size, size] in [-1, 1]."""
    with Image.open(path) as im:
        rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_wav(path: Path, sample_rate: int, num_samples: int) -> torch.Tensor:
    """16-bit PCM WAV -> mono float tensor [num_samples] in [-1, 1], cropped or zero-padded."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        if w.getframerate() != sample_rate:
            raise ValueError(f"{path}: sample rate {w.getframerate()} != bundle's {sample_rate}")
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
        x = x.reshape(-1, w.getnchannels()).mean(axis=1) / 32768.0
    out = np.zeros(num_samples, dtype=np.float32)
    out[: min(num_samples, len(x))] = x[:num_samples]
    return torch.from_numpy(out)


def text_bytes(text: str, max_len: int) -> torch.Tensor:
    """Prompt -> byte ids for the frozen text encoder, padded with TEXT_VOCAB - 1."""
    b = list(text.encode("utf-8"))[:max_len]
    return torch.tensor(b + [TEXT_VOCAB - 1] * (max_len - len(b)), dtype=torch.long)


@dataclass
class Media:
    """Raw inputs of the frozen encoders for a list of examples."""

    images: torch.Tensor  # [N, 3, H, W]
    audio: torch.Tensor  # [N, T]
    text: torch.Tensor  # [N, L] byte ids

    def select(self, idx: torch.Tensor) -> Media:
        return Media(self.images[idx], self.audio[idx], self.text[idx])


def load_media(examples: list[Example], spec: DemoBundle) -> Media:
    return Media(
        torch.stack([load_image(e.image, spec.image_size) for e in examples]),
        torch.stack([load_wav(e.audio, spec.sample_rate, spec.audio_samples) for e in examples]),
        torch.stack([text_bytes(e.prompt, spec.text_max_len) for e in examples]),
    )


@dataclass
class Tokens:
    input_ids: torch.Tensor  # [N, L] right-padded
    labels: torch.Tensor  # [N, L], IGNORE_INDEX outside the target
    attention_mask: torch.Tensor  # [N, L]


def tokenize(examples: list[Example], tokenizer, max_prompt: int, max_target: int) -> Tokens:
    """Prompt + target + eos per example; labels only on target and eos."""
    rows, labels = [], []
    for e in examples:
        p = tokenizer(e.prompt, add_special_tokens=False)["input_ids"][:max_prompt]
        t = tokenizer(e.target, add_special_tokens=False)["input_ids"][:max_target]
        t = [*t, tokenizer.eos_token_id]
        rows.append(p + t)
        labels.append([IGNORE_INDEX] * len(p) + t)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return Tokens(ids, lab, mask)


@dataclass
class Split:
    """One split in memory: token tensors plus either cached features or raw media."""

    ids: list[str]
    tokens: Tokens
    features: torch.Tensor | None = None  # [N, T, align_dim] from the feature cache
    media: Media | None = None  # raw inputs when the encoders run every step
    num_tokens: int = field(default=0)  # target + prompt tokens, for throughput

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: torch.Tensor, trim: bool = True) -> dict[str, torch.Tensor | Media]:
        """Rows `idx`, trimmed to the longest sequence in the batch (`trim=False`: every
        batch as long as the split's longest row, a static shape for compiled steps)."""
        mask = self.tokens.attention_mask[idx]
        # host value from a CPU tensor: no device sync
        length = int(mask.sum(1).max()) if trim else mask.shape[1]
        out: dict[str, torch.Tensor | Media] = {
            "input_ids": self.tokens.input_ids[idx, :length],
            "labels": self.tokens.labels[idx, :length],
            "attention_mask": mask[:, :length],
        }
        if self.features is not None:
            # Features held on the GPU are gathered there (the indices go over pinned).
            out["features"] = self.features[to_device(idx, self.features.device)]
        else:
            assert self.media is not None
            out["media"] = self.media.select(idx)
        return out


FEATURES_ON_DEVICE_BYTES = 2 * 2**30  # data.features_on_device: null holds at most this


def features_on_device(split: Split, device: torch.device, setting: bool | None) -> bool:
    """Whether `split`'s cached features should live on `device` (`data.features_on_device`):
    only on a GPU, and with null only when they fit in FEATURES_ON_DEVICE_BYTES."""
    if split.features is None or device.type != "cuda" or setting is False:
        return False
    return setting or split.features.numel() * split.features.element_size() \
        <= FEATURES_ON_DEVICE_BYTES


def place_features(split: Split, device: torch.device, setting: bool | None,
                   shared: dict[tuple[str, ...], torch.Tensor] | None = None) -> Split:
    """`split` with its features on `device` where `features_on_device` says so; `shared`
    (a trial group's) keeps one device copy per set of rows for every member."""
    if not features_on_device(split, device, setting):
        return split
    shared = {} if shared is None else shared
    key = tuple(split.ids)
    if key not in shared:
        shared[key] = split.features.to(device)
    return replace(split, features=shared[key])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, without a hidden sync on CUDA.

    A copy from pageable host memory first waits for everything already queued on the
    stream (CUDA stages it through its own pinned buffer), so a per-step batch copied
    that way would let the host run no further ahead of the GPU than one step, whatever
    the read-back window. From pinned memory the copy is a plain asynchronous DMA; the
    caching host allocator keeps the pinned block alive until the copy has run.
    """
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of an epoch: a pure function of (seed, epoch), so resume is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/eval split of one manifest."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(examples) * fraction))
    ev = sorted(order[:n_eval])
    tr = sorted(order[n_eval:])
    return [examples[i] for i in tr], [examples[i] for i in ev]
