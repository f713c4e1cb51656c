"""Random-init Hugging Face encoders and an aligner, built from configs and saved with
`save_pretrained` (nothing downloaded): real architectures for GPU figures
(configs/reference.yaml) and tiny ones for tests. Each directory loads with
`AutoModel` and its own processor, exactly like a downloaded checkpoint.

`reference_phase1` is a Phase 1 factory (docs/own-model.md, route 2) for
configs/reference.yaml: on first use it writes a CLIP ViT-B/16 vision tower, a Whisper-base
encoder and a BERT-base encoder (random init, seeded) and an aligner into `directory`, then
returns them as the Phase 1 of route 1 (`trainer.phase1.hf.HFPhase1`) with that route's
prefix-token rules. `reference_phase1.meta` builds the same module on the meta device, so
`--count-params` counts it without writing or allocating anything.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

IMAGE_KINDS = ("clip", "siglip", "vit")
AUDIO_KINDS = ("whisper", "wav2vec2", "ast")


def build_image_encoder(directory: Path, kind: str = "clip", *, hidden: int = 32,
                        layers: int = 1, heads: int = 2, image_size: int = 32,
                        patch_size: int = 8, seed: int = 0) -> Path:
    """A vision tower (CLIP's, SigLIP's or a ViT) and its image processor."""
    model_cls, cfg, proc = image_parts(kind, hidden=hidden, layers=layers, heads=heads,
                                       image_size=image_size, patch_size=patch_size)
    return _save_random(model_cls, cfg, proc, directory, seed)


def image_parts(kind: str, *, hidden: int, layers: int, heads: int, image_size: int,
                patch_size: int) -> tuple[Any, Any, Any]:
    """(model class, config, image processor) of a vision tower `kind`."""
    import transformers as tf

    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, image_size=image_size, patch_size=patch_size)
    size = {"height": image_size, "width": image_size}
    if kind == "clip":
        model_cls, cfg = tf.CLIPVisionModel, tf.CLIPVisionConfig(**common)
        proc = tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                     crop_size=size)
    elif kind == "siglip":
        model_cls, cfg = tf.SiglipVisionModel, tf.SiglipVisionConfig(**common)
        proc = tf.SiglipImageProcessor(size=size)
    elif kind == "vit":
        model_cls, cfg = tf.ViTModel, tf.ViTConfig(**common)
        proc = tf.ViTImageProcessor(size=size)
    else:
        raise ValueError(f"image kind {kind!r}: one of {IMAGE_KINDS}")
    return model_cls, cfg, proc


def build_audio_encoder(directory: Path, kind: str = "whisper", *, hidden: int = 32,
                        layers: int = 1, heads: int = 2, seed: int = 0) -> Path:
    """Whisper (full model; the trainer uses its encoder), wav2vec2 or AST, and its extractor.

    The tiny AST reads 32 mel bins and 128 fbank frames (1.28 s): a grid of 2 frequency x
    15 time patches (16 x 16 patches, time stride 8)."""
    model_cls, cfg, proc = audio_parts(kind, hidden=hidden, layers=layers, heads=heads)
    return _save_random(model_cls, cfg, proc, directory, seed)


def audio_parts(kind: str, *, hidden: int, layers: int, heads: int) -> tuple[Any, Any, Any]:
    """(model class, config, feature extractor) of an audio encoder `kind`."""
    import transformers as tf

    if kind == "whisper":
        # The trainer keeps Whisper's encoder only: the decoder is one small layer.
        cfg = tf.WhisperConfig(d_model=hidden, encoder_layers=layers, decoder_layers=1,
                               encoder_attention_heads=heads, decoder_attention_heads=heads,
                               encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden,
                               num_mel_bins=80, vocab_size=64, max_target_positions=32,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1)
        model_cls, proc = tf.WhisperModel, tf.WhisperFeatureExtractor(feature_size=80)
    elif kind == "wav2vec2":
        cfg = tf.Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=4 * hidden,
                                conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                vocab_size=32)
        model_cls = tf.Wav2Vec2Model
        proc = tf.Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True)
    elif kind == "ast":
        # The extractor and the model must agree on mel bins and max_length.
        mels, frames = 32, 128
        cfg = tf.ASTConfig(hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden,
                           patch_size=16, frequency_stride=16, time_stride=8,
                           num_mel_bins=mels, max_length=frames)
        model_cls = tf.ASTModel
        proc = tf.ASTFeatureExtractor(num_mel_bins=mels, max_length=frames)
    else:
        raise ValueError(f"audio kind {kind!r}: one of {AUDIO_KINDS}")
    return model_cls, cfg, proc


TEXT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
              *string.ascii_lowercase, *string.digits, *string.punctuation,
              *(f"##{c}" for c in string.ascii_lowercase + string.digits)]


def build_text_encoder(directory: Path, *, hidden: int = 32, layers: int = 1, heads: int = 2,
                       vocab_size: int | None = None, max_positions: int = 128,
                       seed: int = 0) -> Path:
    """A BERT encoder and a WordPiece tokenizer over a character vocabulary (the model's
    embedding may be larger: `vocab_size`, e.g. BERT-base's 30522)."""
    import transformers as tf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(TEXT_VOCAB) + "\n")
    tok = tf.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    cfg = text_config(hidden=hidden, layers=layers, heads=heads, vocab_size=vocab_size,
                      max_positions=max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.BertModel(cfg)  # with its pooler: what AutoModel loads (the trainer
    model.save_pretrained(directory)  # reads last_hidden_state only)
    tok.save_pretrained(directory)
    return directory


def text_config(*, hidden: int, layers: int, heads: int, vocab_size: int | None = None,
                max_positions: int = 128) -> Any:
    """The BertConfig of build_text_encoder (vocab_size null = the character vocabulary)."""
    import transformers as tf

    return tf.BertConfig(vocab_size=vocab_size or len(TEXT_VOCAB), hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, max_position_embeddings=max_positions)


def build_aligner(path: Path, widths: dict[str, int], align_dim: int,
                  hidden: int | None = None, seed: int = 0) -> Path:
    """An aligner file in trainer.phase1.hf's layout: one head per modality."""
    heads = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, width in widths.items():
            if hidden is None:
                heads[name] = nn.Sequential(nn.Linear(width, align_dim), nn.LayerNorm(align_dim))
            else:
                heads[name] = nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                            nn.Linear(hidden, align_dim),
                                            nn.LayerNorm(align_dim))
    state = {f"{n}.{k}": v.contiguous() for n, h in heads.items()
             for k, v in h.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return Path(path)


def _save_random(model_cls, cfg, processor, directory: Path, seed: int) -> Path:
    """A random-init `model_cls(cfg)` (seeded, the global RNG untouched) and its processor,
    saved together with save_pretrained, as a user's local encoder directory would be."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


# ------------------------------------------------------------------ the reference Phase 1

# Sizes of the reference parts (`scale: reference`: the public checkpoints' shapes) and of a
# tiny copy (`scale: tiny`) that drives the same code on CPU in the tests.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {
        "image": dict(kind="clip", hidden=768, layers=12, heads=12, image_size=224,
                      patch_size=16),  # CLIP ViT-B/16's vision tower
        "audio": dict(kind="whisper", hidden=512, layers=6, heads=8),  # Whisper-base encoder
        "text": dict(hidden=768, layers=12, heads=12, vocab_size=30522,
                     max_positions=512),  # BERT-base
    },
    "tiny": {
        "image": dict(kind="clip", hidden=32, layers=1, heads=2, image_size=32, patch_size=8),
        "audio": dict(kind="whisper", hidden=32, layers=1, heads=2),
        "text": dict(hidden=32, layers=1, heads=2),
    },
}
REFERENCE_DIR = "runs/_assets/reference-parts"  # relative to the working directory


def reference_hf_config(directory: Path) -> Any:
    """The route-1 `phase1:` section over the parts in `directory`: every image token
    (197 for ViT-B/16 at 224), every Whisper frame of the clip (50 a second), the mean of
    the prompt's BERT tokens."""
    from trainer.config import Phase1 as Phase1Config

    d = Path(directory)
    return Phase1Config(source="hf", image={"path": d / "image"},
                        audio={"path": d / "audio", "frames_per_token": 1},
                        text={"path": d / "text", "pooling": "mean"},
                        aligner_path=d / "aligner.safetensors")


def _widths(sizes: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {name: spec["hidden"] for name, spec in sizes.items()}


def write_reference_parts(directory: Path, scale: str = "reference",
                          align_dim: int = 1024) -> Path:
    """The parts of `scale` under `directory/<scale>-<hash of the sizes>`, written once
    (atomically: concurrent callers see a whole set or build their own)."""
    from trainer.demo_assets import spec_hash
    from trainer.fsutil import build_once

    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}: one of {sorted(SCALES)}")
    sizes = SCALES[scale]
    target = Path(directory) / f"{scale}-{spec_hash([sizes, align_dim])}"

    def build(d: Path) -> None:
        build_image_encoder(d / "image", **sizes["image"], seed=1)
        build_audio_encoder(d / "audio", **sizes["audio"], seed=2)
        build_text_encoder(d / "text", **sizes["text"], seed=3)
        build_aligner(d / "aligner.safetensors", _widths(sizes), align_dim, seed=4)
    return build_once(target, build)


def reference_phase1(directory: str = REFERENCE_DIR, scale: str = "reference",
                     align_dim: int = 1024) -> nn.Module:
    """Factory (`phase1.factory: "trainer.phase1.random_parts:reference_phase1"`): the
    reference parts, written on first use, as the route-1 Phase 1."""
    from trainer.phase1.hf import HFPhase1

    return HFPhase1(reference_hf_config(write_reference_parts(Path(directory), scale,
                                                              align_dim)))


def reference_phase1_meta(directory: str = REFERENCE_DIR, scale: str = "reference",
                          align_dim: int = 1024) -> nn.Module:
    """`reference_phase1`'s module on the meta device, from the configs alone (nothing
    written or allocated): what --count-params counts. Its text tokenizer is left out (a
    meta module encodes nothing)."""
    from trainer.phase1.hf import HFPhase1

    sizes = SCALES[scale]
    img_cls, img_cfg, img_proc = image_parts(**sizes["image"])
    aud_cls, aud_cfg, aud_proc = audio_parts(**sizes["audio"])
    with torch.device("meta"):
        parts = {"image": (img_cls(img_cfg), img_proc), "audio": (aud_cls(aud_cfg), aud_proc),
                 "text": (_bert(text_config(**sizes["text"])), None)}
        aligner = {}
        for name, width in _widths(sizes).items():
            aligner.update({f"{name}.0.weight": torch.empty(align_dim, width),
                            f"{name}.0.bias": torch.empty(align_dim),
                            f"{name}.1.weight": torch.empty(align_dim),
                            f"{name}.1.bias": torch.empty(align_dim)})
        return HFPhase1(reference_hf_config(Path(directory) / scale), parts, aligner)


def _bert(cfg: Any) -> nn.Module:
    import transformers as tf

    return tf.BertModel(cfg)


# The factory's meta-device twin, for parameter counts (trainer.param_count).
reference_phase1.meta = reference_phase1_meta
