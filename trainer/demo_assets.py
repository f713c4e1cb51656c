"""Self-contained demo inputs, generated on first use (nothing is downloaded).

- a Phase 1 bundle (random init, real bundle format),
- a tiny Qwen2-architecture LLM and a character-level tokenizer, saved with
  `save_pretrained` and later loaded through `from_pretrained(local_dir)`,
- a dataset: PNG images of coloured shapes and WAV tones, written to disk with a
  JSONL manifest. The target text names the colour, shape and pitch, so it can
  only be predicted from the image and audio: the task is learnable, and the loss
  falls only if the projector learns to carry the features into the LLM.

Each asset lives in a directory named by a hash of its spec, built with
`fsutil.build_once` (temp dir + rename), so concurrent builders never corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.progress_bar import progress

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (230, 210, 40), "purple": (140, 60, 190), "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}
PROMPTS = ("Describe what you see and hear:", "What is shown and played?", "Caption:")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]  # one token each
DEMO_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)  # what the demo tokenizer holds


def spec_hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- tokenizer + LLM

def build_char_tokenizer(directory: Path) -> None:
    """A character-level fast tokenizer, saved with save_pretrained."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


def demo_llm_config(spec: dict):
    """The demo LLM's Qwen2Config from its `demo.llm` spec (vocab_size null = the demo
    tokenizer's size): what build_demo_llm saves, and what a meta-device check builds."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=spec.get("vocab_size") or DEMO_VOCAB_SIZE,
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        intermediate_size=spec["intermediate_size"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def build_demo_llm(spec: dict, directory: Path, seed: int = 0) -> None:
    """Random-init Qwen2-architecture causal LM + tokenizer, saved to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_char_tokenizer(directory)
    vocab = spec.get("vocab_size") or len(AutoTokenizer.from_pretrained(str(directory)))
    config = demo_llm_config({**spec, "vocab_size": vocab})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        if spec.get("pretrain_steps"):
            tok = AutoTokenizer.from_pretrained(str(directory))
            _pretrain_on_captions(model, tok, spec["pretrain_steps"], seed)
    model.save_pretrained(str(directory))


def demo_caption(rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, target) drawn like the demo dataset's, without the media."""
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    pitch = list(PITCHES)[rng.integers(len(PITCHES))]
    return PROMPTS[rng.integers(len(PROMPTS))], f"a {color} {shape} and a {pitch} tone"


def _pretrain_on_captions(model, tokenizer, steps: int, seed: int) -> None:
    """A short text-only pretraining, so the demo LLM is a *pretrained* LLM as in Phase 2.

    It learns the caption language (templates and words) but cannot know which
    colour, shape or pitch an example has: only the projected image/audio features
    can tell it, which is what Phase 2 then learns.
    """
    import torch

    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in progress(range(steps), total=steps, desc="[demo] pretraining the demo LLM",
                      unit="step"):
        texts = [" ".join(demo_caption(rng)) for _ in range(32)]
        enc = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt",
                        padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


# --------------------------------------------------------------------------- dataset

def _draw(shape: str, rgb: tuple[int, int, int], size: int,
          rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 60, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    return img


def _tone(freq: float, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / rate
    amp = rng.uniform(0.4, 0.8)
    phase = rng.uniform(0, 2 * math.pi)
    x = amp * np.sin(2 * math.pi * freq * t + phase) + rng.normal(0, 0.02, n)
    return (np.clip(x, -1, 1) * 32767).astype("<i2")


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def build_demo_dataset(directory: Path, num_examples: int, image_size: int,
                       sample_rate: int, audio_samples: int, seed: int) -> None:
    """Write `manifest.jsonl` plus PNG/WAV files; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    (directory / "images").mkdir(parents=True)
    (directory / "audio").mkdir()
    lines = []
    for i in range(num_examples):
        prompt, target = demo_caption(rng)
        _, color, shape, _, _, pitch, _ = target.split(" ")
        img_rel, wav_rel = f"images/{i:05d}.png", f"audio/{i:05d}.wav"
        _draw(shape, COLORS[color], image_size, rng).save(directory / img_rel)
        write_wav(directory / wav_rel, _tone(PITCHES[pitch], audio_samples, sample_rate, rng),
                  sample_rate)
        lines.append({"id": f"demo-{i:05d}", "image": img_rel, "audio": wav_rel,
                      "prompt": prompt, "target": target})
    with open(directory / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
