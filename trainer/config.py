"""Typed, strict configuration of one Phase 2 run.

A YAML file is validated once here and turned into plain typed objects; nothing
downstream reads raw dicts. The seed's `phase2:` block is the first section and
loads unchanged; every other section defaults to the self-contained demo, so a
file holding only a `phase2:` block is a complete config.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from trainer.errors import ConfigError, Problem
from trainer.yaml_io import load_yaml_file, parse_scalar

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored;
    # allow_inf_nan=False: `.inf` / `.nan` are never a sensible LR, eps or size.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        # A NUL byte makes every file-system call raise; refuse it as bad input.
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, str) and "\0" in value:
                    raise ValueError(f"{key}: contains a NUL byte")
        return data


class Phase2(_Strict):
    """The seed's `phase2:` block plus the knobs it leaves implicit."""

    learning_rate: float = Field(1e-4, gt=0)  # base LR; the groups' LRs derive from it
    projector_lr: float | None = Field(None, gt=0)  # explicit projector LR; overrides the mult
    lora_lr: float | None = Field(None, gt=0)  # explicit LoRA LR; overrides the mult
    projector_lr_mult: float = Field(5.0, gt=0)  # projector LR = base x this (from scratch: high)
    lora_lr_mult: float = Field(0.5, gt=0)  # LoRA LR = base x this (pretrained: low)
    epochs: int = Field(3, ge=1)  # passes over the training set (unless total_training_steps)
    batch_size: int = Field(2, ge=1)  # examples per micro-batch
    warmup_steps: int = Field(500, ge=0)  # linear warmup, in optimizer steps
    gradient_clip_val: float | None = Field(None, ge=0)  # global-norm clip; null or 0 = off
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    total_training_steps: int | None = Field(None, ge=1)  # optimizer steps; default from epochs
    # AdamW decoupled weight decay on both groups; 0.01 = torch's default, which the seed gets
    # by building torch.optim.AdamW(param_groups) without naming it.
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    seed: int = 42  # seeds init, data order and dropout; same seed = same losses
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype over fp32 weights
    nan_policy: Literal["skip", "stop"] = "skip"  # on a non-finite loss/grad: skip step or stop
    max_consecutive_nan: int = Field(5, ge=1)  # `skip` aborts after this many bad steps in a row
    divergence_factor: float | None = Field(None, gt=1)  # stop if loss > factor x first loss

    @property
    def resolved_projector_lr(self) -> float:
        return self.projector_lr if self.projector_lr is not None else (
            self.learning_rate * self.projector_lr_mult)

    @property
    def resolved_lora_lr(self) -> float:
        return self.lora_lr if self.lora_lr is not None else self.learning_rate * self.lora_lr_mult

    @property
    def clip(self) -> float | None:
        return self.gradient_clip_val or None


class Phase1(_Strict):
    """Where the frozen Phase 1 encoders and aligner come from."""

    bundle_path: Path | None = None  # a Phase 1 bundle directory; null = build the demo bundle


class LoRA(_Strict):
    r: int = Field(8, ge=1)  # adapter rank
    alpha: float = Field(16.0, gt=0)  # scaling = alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )


class Projector(_Strict):
    hidden_dim: int | None = Field(None, ge=1)  # MLP width; null = 4 x LLM hidden size
    dropout: float = Field(0.0, ge=0, lt=1)


class Model(_Strict):
    llm_path: Path | None = None  # local HF model dir (from_pretrained); null = demo tiny LLM
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"  # torch.compile
    # the model's forward (reduce-overhead: CUDA graphs); the first steps pay the compile time
    skip_compile_guards: bool = True  # a compiled forward skips TorchDynamo's guard check
    # (~2 ms of host time a call) on calls that repeat a warmed-up signature
    # (trainer.compile_guards); false checks every call
    cast_frozen_linears: bool = True  # bf16/fp16 runs store the frozen LLM linears that no
    # LoRA wraps (MLP, ~2/3 of a Qwen LLM) in that dtype: same outputs, half their memory
    lora: LoRA = Field(default_factory=LoRA)
    projector: Projector = Field(default_factory=Projector)

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 (and so `compile: off` in most editors' YAML, or --set model.compile=off)
        # reads off/on as booleans; they mean "off" / "default" here, not a type error.
        if isinstance(value, bool):
            return "default" if value else "off"
        return value


class Data(_Strict):
    manifest: Path | None = None  # JSONL manifest; null = generate the demo dataset
    eval_manifest: Path | None = None  # held-out JSONL; null = split eval_fraction off
    eval_fraction: float = Field(0.1, ge=0, lt=1)  # used only without eval_manifest
    max_prompt_tokens: int = Field(32, ge=1)
    max_target_tokens: int = Field(32, ge=1)
    feature_cache: bool = True  # run frozen encoders once and train on cached features
    # On a GPU, hold the train split's cached features in GPU memory (no host gather and
    # copy per step); null = when they take at most 2 GiB. A trial group holds one copy.
    features_on_device: bool | None = None


class EncoderSpec(_Strict):
    dim: int = Field(32, ge=8)
    layers: int = Field(1, ge=1)
    heads: int = Field(2, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)


class DemoBundle(_Strict):
    """Sizes of the demo Phase 1 bundle (random init, real bundle format)."""

    image_size: int = Field(32, ge=8)
    patch_size: int = Field(8, ge=1)
    sample_rate: int = Field(8000, ge=1000)
    audio_samples: int = Field(2000, ge=16)  # samples per clip
    frame_size: int = Field(250, ge=1)  # audio samples per encoder token
    text_max_len: int = Field(32, ge=1)  # bytes of the prompt the text encoder reads
    align_dim: int = Field(32, ge=8)
    aligner_hidden: int | None = None  # null = linear aligner heads
    image: EncoderSpec = Field(default_factory=EncoderSpec)
    audio: EncoderSpec = Field(default_factory=EncoderSpec)
    text: EncoderSpec = Field(default_factory=EncoderSpec)


class DemoLLM(_Strict):
    """A Qwen2-architecture LLM built from a config (random init), saved, then loaded."""

    hidden_size: int = Field(64, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    vocab_size: int | None = None  # null = the demo tokenizer's size
    tie_word_embeddings: bool = True
    pretrain_steps: int = Field(300, ge=0)  # text-only pretraining on demo captions (0 = none)


class Demo(_Strict):
    num_examples: int = Field(512, ge=8)  # demo dataset size (train + eval)
    data_seed: int = 0  # the demo dataset is a pure function of this seed and size
    bundle: DemoBundle = Field(default_factory=DemoBundle)
    llm: DemoLLM = Field(default_factory=DemoLLM)

    @model_validator(mode="after")
    def _shapes(self) -> Demo:
        b = self.bundle
        if b.image_size % b.patch_size:
            raise ValueError("demo.bundle.image_size must be a multiple of patch_size")
        if b.audio_samples % b.frame_size:
            raise ValueError("demo.bundle.audio_samples must be a multiple of frame_size")
        for name in ("image", "audio", "text"):
            e: EncoderSpec = getattr(b, name)
            if e.dim % e.heads:
                raise ValueError(f"demo.bundle.{name}.dim must be a multiple of heads")
        if self.llm.hidden_size % self.llm.num_attention_heads:
            raise ValueError("demo.llm.hidden_size must be a multiple of num_attention_heads")
        if self.llm.num_attention_heads % self.llm.num_key_value_heads:
            raise ValueError("demo.llm.num_attention_heads must be a multiple of kv heads")
        return self


class Output(_Strict):
    root: Path = Path("runs")  # every file a run writes stays under this directory
    run_name: str | None = None  # run directory under root; null = timestamped
    assets_dir: Path | None = None  # demo assets + feature caches; null = <root>/_assets
    log_every: int = Field(10, ge=1)  # console progress line every N optimizer steps
    eval_every: int = Field(0, ge=0)  # eval loss every N steps (0 = only at the end)
    checkpoint_every: int = Field(0, ge=0)  # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept (fallback if one is bad)
    save_weights: bool = True  # write trainable.safetensors (projector + LoRA) at the end
    sync_every: int | None = Field(None, ge=1)  # read step metrics back every N optimizer
    # steps: the NaN guard, clipping and stop policy act on the device at every step, the
    # host waits for the GPU only every N; null = 10 on CUDA, 1 (host guard) on the CPU

    @model_validator(mode="after")
    def _name(self) -> Output:
        if self.run_name is not None and (
            not NAME_RE.match(self.run_name) or self.run_name in {".", ".."}
        ):
            raise ValueError(f"output.run_name {self.run_name!r} must match {NAME_RE.pattern}")
        return self


class Debug(_Strict):
    """Fault injection, to test stability handling end to end (never set in real runs)."""

    inject_nan_at_step: int | None = Field(None, ge=1)  # make one group's gradient NaN here
    inject_nan_group: Literal["projector", "lora"] = "projector"
    hang_at_step: int | None = Field(None, ge=1)  # sleep forever here (stall watchdog tests)


class TrainConfig(_Strict):
    """One Phase 2 run: the seed's block plus everything it leaves to defaults."""

    phase2: Phase2 = Field(default_factory=Phase2)
    phase1: Phase1 = Field(default_factory=Phase1)
    model: Model = Field(default_factory=Model)
    data: Data = Field(default_factory=Data)
    demo: Demo = Field(default_factory=Demo)
    output: Output = Field(default_factory=Output)
    debug: Debug = Field(default_factory=Debug)

    @property
    def assets_dir(self) -> Path:
        return self.output.assets_dir or self.output.root / "_assets"

    def to_plain(self) -> dict[str, Any]:
        """Plain data for YAML/JSON: paths as strings, tuples as lists."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading

def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (for suggestions)."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def validation_problems(err: ValidationError, source: str, root: type[BaseModel],
                        example: str) -> list[Problem]:
    """One Problem per pydantic error; unknown keys get the nearest valid name."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(root, loc)
            names = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            fix = f"did you mean '{close[0]}'?" if close else (
                f"valid keys here: {', '.join(names)}" if names else "remove it")
            out.append(Problem(source, key, "unknown key", fix))
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            out.append(Problem(source, key, msg, "change the value"))
        else:
            got = e.get("input")
            out.append(Problem(source, key, f"{e['msg']} (got {got!r})",
                               f"fix the value, see {example} for an example"))
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str = "--set") -> None:
    """Set `a.b.c` in nested raw data; a path through a non-section is a ConfigError."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError([Problem(source, dotted, "empty part in a dotted key",
                                   "write keys like phase2.learning_rate")])
    node = data
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:  # a missing or null section becomes a new one
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError([Problem(source, dotted,
                                       f"{'.'.join(parts[: i + 1])} is not a section",
                                       "set a leaf key such as phase2.learning_rate")])
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to raw config data."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([Problem("--set", item, "expected key=value",
                                       "e.g. --set phase2.learning_rate=2e-4")])
        set_dotted(data, key.strip(), parse_scalar(raw))
    return data


def _absolutize(cfg: TrainConfig) -> TrainConfig:
    # Ray runs trials in other working directories: pin every path now.
    cfg.phase1.bundle_path = cfg.phase1.bundle_path and cfg.phase1.bundle_path.resolve()
    cfg.model.llm_path = cfg.model.llm_path and cfg.model.llm_path.resolve()
    cfg.data.manifest = cfg.data.manifest and cfg.data.manifest.resolve()
    cfg.data.eval_manifest = cfg.data.eval_manifest and cfg.data.eval_manifest.resolve()
    cfg.output.root = cfg.output.root.resolve()
    cfg.output.assets_dir = cfg.output.assets_dir and cfg.output.assets_dir.resolve()
    return cfg


def _check_paths(cfg: TrainConfig, source: str) -> list[Problem]:
    problems = []
    for key, p in (("phase1.bundle_path", cfg.phase1.bundle_path),
                   ("model.llm_path", cfg.model.llm_path)):
        if p is not None and not p.is_dir():
            problems.append(Problem(source, key, f"directory {p} not found",
                                    "point it at a local directory, or null for the demo"))
    for key, p in (("data.manifest", cfg.data.manifest),
                   ("data.eval_manifest", cfg.data.eval_manifest)):
        if p is not None and not p.is_file():
            problems.append(Problem(source, key, f"file {p} not found",
                                    "point it at a JSONL manifest, or null for the demo"))
    return problems


def _wrap_bare_phase2(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The seed also shows bare blocks (`learning_rate: ...` at the top): read them as phase2."""
    sections, knobs = set(TrainConfig.model_fields), set(Phase2.model_fields)
    bare = [k for k in data if k in knobs and k not in sections]
    if not bare:
        return data
    if any(k in sections for k in data):
        raise ConfigError([Problem(source, k, "Phase 2 knob at the top level next to sections",
                                   f"move it under `phase2:` (phase2.{k})") for k in bare])
    return {"phase2": data}


def config_from_data(data: Any, source: str = "<config>") -> TrainConfig:
    """Validate raw config data (as parsed from YAML) into a TrainConfig."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, "", "the top level must be a mapping",
                                   "start the file with `phase2:`")])
    data = _wrap_bare_phase2(data, source)
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_problems(err, source, TrainConfig,
                                              "configs/phase2.yaml")) from None
    cfg = _absolutize(cfg)
    problems = _check_paths(cfg, source)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load, override and validate a Phase 2 config file."""
    data = load_yaml_file(path)
    if data is None:
        data = {}
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return config_from_data(data, str(path))
