"""Manifest reading, tokenization and batching.

Manifest: JSONL, one example per line:
    {"id": "...", "image": "images/0.png", "audio": "audio/0.wav",
     "prompt": "Describe ...", "target": "a red circle ..."}
Media paths are relative to the manifest's directory (absolute paths allowed).
`image` and `audio` are each optional, but an example needs at least one of them: an
example without a modality gets no prefix tokens for it (the rule is in
docs/own-model.md). `id`s must be unique and `target` non-empty; both are checked for
the whole manifest before anything trains. Media files are read by trainer.media.

Sequence layout fed to the LLM, per example:
    [its valid prefix tokens] [prompt tokens] [target tokens] </s> [pad ...]
Only target tokens and </s> carry labels; prefix, prompt and padding are -100. A
batch's prefixes may differ in length: the rows are compacted by trainer.model
(`final_hidden`), so each row stays right-padded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.bundle import TEXT_VOCAB
from trainer.config import DemoBundle
from trainer.errors import ConfigError, Problem
from trainer.media import MediaError, read_audio, read_image

IGNORE_INDEX = -100
MODALITIES = ("image", "audio")  # media keys of a manifest line; at least one per example
MAX_PROBLEMS = 20  # problems listed per manifest (the first ones; the count is printed)


@dataclass(frozen=True)
class Example:
    id: str
    image: Path | None
    audio: Path | None
    prompt: str
    target: str
    where: str = ""  # "manifest.jsonl:7", for messages


def _line_problems(obj, where: str, base: Path) -> tuple[list[Problem], Example | None]:
    if not isinstance(obj, dict):
        return [Problem(where, "", "not a JSON object", "one JSON object per line")], None
    problems = []
    for key in ("prompt", "target"):
        if not isinstance(obj.get(key), str):
            problems.append(Problem(where, key, "missing or not a string",
                                    "each line needs prompt and target strings"))
    if isinstance(obj.get("target"), str) and not obj["target"].strip():
        problems.append(Problem(where, "target", "empty target",
                                "give every example a non-empty target, or drop the line"))
    paths: dict[str, Path | None] = {}
    for key in MODALITIES:
        value = obj.get(key)
        if value is None:
            paths[key] = None
        elif not isinstance(value, str) or not value:
            problems.append(Problem(where, key, "not a file path",
                                    "a path relative to the manifest, or leave the key out"))
        else:
            paths[key] = p = base / value
            if not p.is_file():
                problems.append(Problem(where, key, f"file {p} not found",
                                        "paths are relative to the manifest's directory"))
    if not problems and all(v is None for v in paths.values()):
        problems.append(Problem(where, "image,audio", "neither an image nor an audio file",
                                "give the example an image, an audio clip or both"))
    if "id" in obj and not isinstance(obj["id"], str | int):
        problems.append(Problem(where, "id", "not a string", "ids are strings"))
    if problems:
        return problems, None
    n = where.rsplit(":", 1)[-1]
    return [], Example(str(obj.get("id", n)), paths["image"], paths["audio"], obj["prompt"],
                       obj["target"], where)


def read_manifest(path: Path) -> list[Example]:
    """Parse a JSONL manifest; every bad line is reported with its line number, and
    duplicate ids with both lines (a duplicate would make one row train on the other's
    features)."""
    problems, examples, seen = [], [], {}
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
        found, example = _line_problems(obj, where, base)
        problems += found
        if example is None:
            continue
        if example.id in seen:
            problems.append(Problem(where, "id", f"duplicate id {example.id!r} (also on line "
                                    f"{seen[example.id]})", "give every example its own id"))
            continue
        seen[example.id] = n
        examples.append(example)
    if not examples and not problems:
        problems.append(Problem(str(path), "", "manifest is empty", "add examples"))
    if problems:
        if len(problems) > MAX_PROBLEMS:
            extra = len(problems) - MAX_PROBLEMS
            problems = [*problems[:MAX_PROBLEMS],
                        Problem(str(path), "", f"and {extra} more problems", "fix the above")]
        raise ConfigError(problems)
    return examples


def media_problem(example: Example, key: str, err: MediaError) -> Problem:
    """One line naming the manifest line, the key and the file that failed."""
    return Problem(example.where or example.id, key, str(err),
                   "replace or re-encode the file, or drop the line")


def check_media(examples: list[Example]) -> list[Problem]:
    """Open every media file once (a sweep's dry run): one problem per bad file."""
    problems = []
    for e in examples:
        try:
            if e.image is not None:
                read_image(e.image)
        except MediaError as err:
            problems.append(media_problem(e, "image", err))
        try:
            if e.audio is not None:
                read_audio(e.audio, None)
        except MediaError as err:
            problems.append(media_problem(e, "audio", err))
    return problems


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """The demo bundle's preprocessing: RGB -> [3, size, size] in [-1, 1]."""
    rgb = image.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def fit_samples(samples: np.ndarray, num_samples: int) -> torch.Tensor:
    """Mono samples cropped or zero-padded to `num_samples` (the demo bundle's fixed clip)."""
    out = np.zeros(num_samples, dtype=np.float32)
    out[: min(num_samples, len(samples))] = samples[:num_samples]
    return torch.from_numpy(out)


def text_bytes(text: str, max_len: int) -> torch.Tensor:
    """Prompt -> byte ids for the frozen text encoder, padded with TEXT_VOCAB - 1."""
    b = list(text.encode("utf-8"))[:max_len]
    return torch.tensor(b + [TEXT_VOCAB - 1] * (max_len - len(b)), dtype=torch.long)


@dataclass
class Media:
    """Raw inputs of the demo bundle's encoders for a list of examples."""

    images: torch.Tensor  # [N, 3, H, W]
    audio: torch.Tensor  # [N, T]
    text: torch.Tensor  # [N, L] byte ids

    def select(self, idx: torch.Tensor) -> Media:
        return Media(self.images[idx], self.audio[idx], self.text[idx])


def load_media(examples: list[Example], spec: DemoBundle) -> Media:
    """The demo bundle's inputs, for runs that encode every step (`data.feature_cache:
    false`); that path needs both media on every example (no prefix mask there)."""
    problems, images, audio = [], [], []
    for e in examples:
        for key in MODALITIES:
            if getattr(e, key) is None:
                problems.append(Problem(e.where or e.id, key, "missing, but data.feature_cache "
                                        "is false (encoders run every step, every modality "
                                        "needed)", "set data.feature_cache: true"))
        if problems:
            continue
        try:
            images.append(image_tensor(read_image(e.image), spec.image_size))
        except MediaError as err:
            problems.append(media_problem(e, "image", err))
        try:
            audio.append(fit_samples(read_audio(e.audio, spec.sample_rate), spec.audio_samples))
        except MediaError as err:
            problems.append(media_problem(e, "audio", err))
    if problems:
        raise ConfigError(problems[:MAX_PROBLEMS])
    return Media(torch.stack(images), torch.stack(audio),
                 torch.stack([text_bytes(e.prompt, spec.text_max_len) for e in examples]))


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


def prefix_features(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of a split's prefix features [N, T', D] fp32: each row's real tokens first, in
    order, then NaN, the padding mark trainer.model reads (`prefix_embeds`); T' is the
    longest row's count of real tokens."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    feats = features.float().gather(1, order.unsqueeze(-1).expand_as(features))
    real = mask.gather(1, order)
    length = int(real.sum(1).max())
    return feats.masked_fill(~real.unsqueeze(-1), float("nan"))[:, :length].contiguous()


@dataclass
class Split:
    """One split in memory: token tensors plus either cached features or raw media."""

    ids: list[str]
    tokens: Tokens
    features: torch.Tensor | None = None  # [N, T, align_dim] cached; NaN = no token there
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
