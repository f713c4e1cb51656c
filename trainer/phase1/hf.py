"""Hugging Face encoders from local directories + the aligner of your Phase 1.

Each encoder is loaded with `AutoModel.from_pretrained(dir, local_files_only=True)` and
preprocesses with its own `AutoImageProcessor` / `AutoFeatureExtractor` / `AutoTokenizer`.
How an encoder's output becomes prefix tokens (docs/own-model.md states the same):

- image (CLIP, SigLIP, ViT; a dual-tower CLIP/SigLIP dir uses its vision tower): every
  token of `last_hidden_state` ([CLS] included where the model has one), average-pooled
  to `tokens` when set; every image gives the same count.
- audio, Whisper: the encoder always sees 30 s of log-mel (the extractor pads); only
  the frames that cover the clip are kept (ceil(samples / 320) of the 1500, at 16 kHz),
  so a 1 s clip gives 50 frames. Clips over 30 s are cut at 30 s.
- audio, AST: the extractor pads every clip to `max_length` fbank frames (25 ms windows
  every 10 ms) and the encoder cuts that spectrogram into a frequency x time grid of
  patches. The [CLS] and distillation tokens are dropped, each time column of the grid is
  averaged over frequency into one frame, and only the columns that start inside the
  clip's fbank frames are kept (ceil(fbank frames / time_stride); 1 at least), so the
  padding does not become tokens. Clips longer than `max_length` frames are cut.
- audio, anything else (wav2vec2, HuBERT, ...): each clip alone, every frame of
  `last_hidden_state` (wav2vec2: ~50 per second).
- both audio kinds: then `frames_per_token` frames averaged into one token (the last
  token averages what is left).
- text (BERT-like) over the prompt: `mean` = the mean of the real tokens (1 token),
  `cls` = the first token (1 token), `all` = every real token.
Then each modality's tokens go through its aligner head, and the blocks are joined
[image][audio][text]; a missing image or audio (or an empty prompt) has no tokens.

The aligner file (safetensors) holds one head per modality, the layout of the demo
bundle's aligner: `image.0.weight` ... either Linear -> LayerNorm (keys `.0`, `.1`) or
Linear -> GELU -> Linear -> LayerNorm (keys `.0`, `.2`, `.3`); a leading `aligner.` is
dropped, so a bundle's `model.safetensors` works as is. Shapes are checked against the
encoders before anything runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from trainer.config import Phase1 as Phase1Config
from trainer.errors import ConfigError, Problem
from trainer.phase1.contract import DEFAULT_SAMPLE_RATE, RawBatch, module_device

WHISPER_SAMPLES_PER_FRAME = 320  # hop 160 x the encoder's stride-2 conv
AST_MODEL_TYPE = "audio-spectrogram-transformer"
AST_SPECIAL_TOKENS = 2  # [CLS] and distillation token, ahead of the patch grid


def _problem(key: str, what: str, fix: str, source: str = "phase1") -> ConfigError:
    return ConfigError([Problem(source, key, what, fix)])


def _load(kind: str, path: Path, key: str) -> Any:
    """An Auto* object from a local dir, or one line naming the dir and what is missing."""
    import transformers

    cls = getattr(transformers, kind)
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:160]
        raise _problem(key, f"{kind} cannot load {path}: {reason}",
                       "point it at a dir saved with save_pretrained (model and processor "
                       "files)") from None


def _width(config: Any) -> int:
    for name in ("hidden_size", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(config).__name__} has no hidden_size/d_model")


def _head(state: dict[str, torch.Tensor], name: str, in_dim: int, path: Path) -> nn.Module:
    """One aligner head from its tensors, the layout checked against the encoder width."""
    keys = {k.removeprefix(f"{name}.") for k in state if k.startswith(f"{name}.")}
    fix = "write the aligner as docs/own-model.md shows, or use phase1.source: factory"
    if keys == {"0.weight", "0.bias", "1.weight", "1.bias"}:
        out = state[f"{name}.0.weight"].shape[0]
        head = nn.Sequential(nn.Linear(in_dim, out), nn.LayerNorm(out))
    elif keys == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"}:
        hidden, out = state[f"{name}.0.weight"].shape[0], state[f"{name}.2.weight"].shape[0]
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out),
                             nn.LayerNorm(out))
    else:
        raise _problem("phase1.aligner_path", f"{path}: head {name!r} has keys "
                       f"{sorted(keys) or 'none'}", fix)
    got = state[f"{name}.0.weight"].shape
    if got[1] != in_dim:
        raise _problem("phase1.aligner_path", f"{path}: {name}.0.weight is {tuple(got)}, but "
                       f"the {name} encoder's width is {in_dim}", "use the aligner trained "
                       "with these encoders")
    try:
        head.load_state_dict({k: state[f"{name}.{k}"] for k in keys}, strict=True)
    except RuntimeError as e:
        raise _problem("phase1.aligner_path", f"{path}: {name}: "
                       f"{' '.join(str(e).split())[:160]}", fix) from None
    return head


def _pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """Average every k consecutive tokens of x [T, D] (the last group may be shorter)."""
    if k == 1:
        return x
    return torch.stack([c.mean(0) for c in x.split(k)])


def ast_frames(hidden: torch.Tensor, encoder: nn.Module, samples: int,
               sample_rate: int) -> torch.Tensor:
    """AST's tokens [2 + F*T, D] of one clip -> one frame per time column that the clip
    covers, [t, D] with 1 <= t <= T (the rule in the module doc)."""
    freq, time = encoder.embeddings.get_shape(encoder.config)
    grid = hidden[AST_SPECIAL_TOKENS:].reshape(freq, time, -1)  # the conv's frequency-major order
    # The extractor's fbank: 25 ms windows every 10 ms, no centring (400 / 160 at 16 kHz).
    window, hop = sample_rate * 25 // 1000, sample_rate // 100
    fbank_frames = 1 + max(0, samples - window) // hop
    keep = min(time, max(1, math.ceil(fbank_frames / encoder.config.time_stride)))
    return grid[:, :keep].mean(0)


def _rows(blocks: list[torch.Tensor | None], align_dim: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example token blocks -> right-padded [B, T, D] and mask [B, T]."""
    length = max((b.shape[0] for b in blocks if b is not None), default=0)
    feats = torch.zeros(len(blocks), length, align_dim, device=device)
    mask = torch.zeros(len(blocks), length, dtype=torch.bool, device=device)
    for i, b in enumerate(blocks):
        if b is not None:
            feats[i, : b.shape[0]] = b
            mask[i, : b.shape[0]] = True
    return feats, mask


def read_aligner(path: Path) -> dict[str, torch.Tensor]:
    """The aligner file's tensors, a leading `aligner.` dropped (a bundle's weights work)."""
    try:
        return {k.removeprefix("aligner."): v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise _problem("phase1.aligner_path", f"{path}: unreadable safetensors "
                       f"({' '.join(str(e).split())[:120]})", "write it with "
                       "safetensors.torch.save_file") from None


def encoder_tower(model: nn.Module, name: str) -> nn.Module:
    """The part of a loaded `AutoModel` that encodes modality `name`."""
    if name == "image" and hasattr(model, "vision_model"):
        return model.vision_model  # a dual-tower CLIP / SigLIP dir: its vision tower
    if name == "audio" and model.config.is_encoder_decoder:
        return model.get_encoder()  # Whisper: the encoder only
    return model


class HFPhase1(nn.Module):
    """Frozen Hugging Face encoders + aligner heads (the rules are in the module doc)."""

    def __init__(self, cfg: Phase1Config, parts: dict[str, tuple[nn.Module, Any]] | None = None,
                 aligner: dict[str, torch.Tensor] | None = None) -> None:
        """Loads the encoders, processors and aligner that `cfg` names. `parts` (encoders
        with their processors, by modality) and `aligner` (its tensors) replace that
        loading: random_parts builds the reference Phase 1 on the meta device this way."""
        super().__init__()
        path = cfg.aligner_path
        state = read_aligner(path) if aligner is None else aligner
        self.image_cfg, self.audio_cfg, self.text_cfg = cfg.image, cfg.audio, cfg.text
        self.encoders, self.heads = nn.ModuleDict(), nn.ModuleDict()
        self.processors: dict[str, Any] = {}
        self.sample_rate = DEFAULT_SAMPLE_RATE
        for name, kind in (("image", "AutoImageProcessor"), ("audio", "AutoFeatureExtractor"),
                           ("text", "AutoTokenizer")):
            enc = getattr(cfg, name)
            if enc is None:
                continue
            key = f"phase1.{name}.path"
            if parts is None:
                model, processor = _load("AutoModel", enc.path, key), _load(kind, enc.path, key)
            else:
                model, processor = parts[name]
            model = encoder_tower(model, name)
            self.encoders[name] = model
            self.processors[name] = processor
            if name not in {k.split(".")[0] for k in state}:
                raise _problem("phase1.aligner_path", f"{path}: no {name!r} head, but "
                               f"phase1.{name} is set", f"add the {name} head, or drop "
                               f"phase1.{name}")
            self.heads[name] = _head(state, name, _width(model.config), path)
            if name == "audio":
                self.sample_rate = int(self.processors[name].sampling_rate)
        dims = {n: h[-1].normalized_shape[0] for n, h in self.heads.items()}
        if len(set(dims.values())) != 1:
            raise _problem("phase1.aligner_path", f"{path}: heads give different widths {dims}",
                           "every head must map into the same aligned space")
        self.align_dim = next(iter(dims.values()))
        audio_type = self.encoders["audio"].config.model_type if cfg.audio else None
        self.whisper, self.ast = audio_type == "whisper", audio_type == AST_MODEL_TYPE

    def forward(self, batch: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        dev = module_device(self)
        parts: list[list[torch.Tensor | None]] = []
        if "image" in self.encoders:
            parts.append(self._image(batch, dev))
        if "audio" in self.encoders:
            parts.append(self._audio(batch, dev))
        if "text" in self.encoders:
            parts.append(self._text(batch, dev))
        rows = [[p[i] for p in parts if p[i] is not None] for i in range(len(batch.ids))]
        return _rows([torch.cat(r) if r else None for r in rows], self.align_dim, dev)

    def _image(self, batch: RawBatch, dev: torch.device) -> list[torch.Tensor | None]:
        have = [i for i, im in enumerate(batch.images) if im is not None]
        out: list[torch.Tensor | None] = [None] * len(batch.images)
        if not have:
            return out
        pixels = self.processors["image"](images=[batch.images[i] for i in have],
                                          return_tensors="pt")["pixel_values"]
        hidden = self.encoders["image"](pixel_values=pixels.to(dev)).last_hidden_state
        if self.image_cfg.tokens is not None:
            hidden = nn.functional.adaptive_avg_pool1d(
                hidden.transpose(1, 2), self.image_cfg.tokens).transpose(1, 2)
        aligned = self.heads["image"](hidden)
        for j, i in enumerate(have):
            out[i] = aligned[j]
        return out

    def _audio(self, batch: RawBatch, dev: torch.device) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(batch.audio)
        fx, enc, k = self.processors["audio"], self.encoders["audio"], self.audio_cfg
        for i, clip in enumerate(batch.audio):
            if clip is None:
                continue
            inputs = fx(clip, sampling_rate=self.sample_rate, return_tensors="pt")
            name = "input_features" if "input_features" in inputs else "input_values"
            hidden = enc(**{name: inputs[name].to(dev)}).last_hidden_state[0]
            if self.whisper:  # keep the frames that cover the clip, not the 30 s of padding
                hidden = hidden[: max(1, math.ceil(len(clip) / WHISPER_SAMPLES_PER_FRAME))]
            elif self.ast:  # the grid's columns that cover the clip, not its padding
                hidden = ast_frames(hidden, enc, len(clip), self.sample_rate)
            out[i] = self.heads["audio"](_pool(hidden, k.frames_per_token))
        return out

    def _text(self, batch: RawBatch, dev: torch.device) -> list[torch.Tensor | None]:
        have = [i for i, t in enumerate(batch.texts) if t]
        out: list[torch.Tensor | None] = [None] * len(batch.texts)
        if not have:
            return out
        tok = self.processors["text"]([batch.texts[i] for i in have], padding=True,
                                      truncation=True, max_length=self.text_cfg.max_length,
                                      return_tensors="pt")
        real = tok["attention_mask"].to(dev).bool()
        hidden = self.encoders["text"](**{k: v.to(dev) for k, v in tok.items()}
                                       ).last_hidden_state
        for j, i in enumerate(have):
            h = hidden[j][real[j]]
            if self.text_cfg.pooling == "mean":
                h = h.mean(0, keepdim=True)
            elif self.text_cfg.pooling == "cls":
                h = h[:1]
            out[i] = self.heads["text"](h)
        return out
