"""Random-init Hugging Face encoders and an aligner, built from configs and saved with
`save_pretrained` (nothing downloaded): real architectures for GPU figures
(configs/reference.yaml) and tiny ones for tests. Each directory loads with
`AutoModel` and its own processor, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

IMAGE_KINDS = ("clip", "siglip", "vit")
AUDIO_KINDS = ("whisper", "wav2vec2", "ast")


def build_image_encoder(directory: Path, kind: str = "clip", *, hidden: int = 32,
                        layers: int = 1, heads: int = 2, image_size: int = 32,
                        patch_size: int = 8, seed: int = 0) -> Path:
    """A vision tower (CLIP's, SigLIP's or a ViT) and its image processor."""
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
    return _save_random(model_cls, cfg, proc, directory, seed)


def build_audio_encoder(directory: Path, kind: str = "whisper", *, hidden: int = 32,
                        layers: int = 1, heads: int = 2, seed: int = 0) -> Path:
    """Whisper (full model; the trainer uses its encoder), wav2vec2 or AST, and its extractor.

    The tiny AST reads 32 mel bins and 128 fbank frames (1.28 s): a grid of 2 frequency x
    15 time patches (16 x 16 patches, time stride 8)."""
    import transformers as tf

    if kind == "whisper":
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
    return _save_random(model_cls, cfg, proc, directory, seed)


def build_text_encoder(directory: Path, *, hidden: int = 32, layers: int = 1, heads: int = 2,
                       seed: int = 0) -> Path:
    """A BERT encoder and a WordPiece tokenizer over a character vocabulary."""
    import transformers as tf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             *string.ascii_lowercase, *string.digits, *string.punctuation,
             *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = tf.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


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
