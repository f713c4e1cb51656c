"""Typed, strict configuration of one Phase 2 run.

A YAML file is validated once here and turned into plain typed objects; nothing
downstream reads raw dicts. The seed's `phase2:` block is the first section and
loads unchanged; every other section defaults to the self-contained demo, so a
file holding only a `phase2:` block is a complete config.

Over 500 lines because it is the whole schema in one place: a class per YAML section
with its field comments and validators (about 330 lines) and the loading around it
(overrides, relative paths, one error line per problem). docs/config.md is written
from it; split by section, a reader would chase one file's keys through many.
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
from trainer.yaml_io import clip, load_yaml_file, parse_scalar, preview

# `model.compile` values that name a TorchDynamo backend rather than an Inductor mode.
# "cudagraphs": AOTAutograd's forward and backward graphs of torch's own (eager) kernels,
# each replayed as a CUDA graph. No Inductor code generation and no Triton kernels to
# build, so a first compile is Dynamo's and AOTAutograd's traces alone; the kernels are
# not fused, and nothing is kept in the compile cache for a warm start. On a CPU the
# traced graphs run eagerly (torch skips CUDA graphs for CPU tensors).
COMPILE_BACKENDS = {"cudagraphs": "cudagraphs"}

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


class HFImage(_Strict):
    """A Hugging Face image encoder (CLIP, SigLIP, ViT, ...) and its image processor."""

    path: Path  # local dir with config, weights and preprocessor_config.json
    tokens: int | None = Field(None, ge=1)  # pool the patch tokens to this many; null = all


class HFAudio(_Strict):
    """A Hugging Face audio encoder (Whisper's encoder, wav2vec2, AST) and its extractor."""

    path: Path  # local dir with config, weights and preprocessor_config.json
    frames_per_token: int = Field(1, ge=1)  # average this many encoder frames per token


class HFText(_Strict):
    """A Hugging Face text encoder (BERT-like) over the prompt, and its tokenizer."""

    path: Path  # local dir with config, weights and tokenizer files
    pooling: Literal["mean", "cls", "all"] = "mean"  # one token (mean / [CLS]) or every token
    max_length: int = Field(64, ge=1)  # prompt tokens the encoder reads


PHASE1_SOURCES = ("bundle", "hf", "factory", "features")


class Phase1(_Strict):
    """Where the frozen Phase 1 encoders and aligner come from (docs/own-model.md).

    source: bundle   = the project's bundle format (`bundle_path`; null = the demo bundle)
            hf       = Hugging Face encoders from local dirs + an aligner safetensors file
            factory  = your code: "pkg.module:build" called with `kwargs`
            features = precomputed aligned features (`features_path`, trainer.phase1 format)
    """

    source: Literal["bundle", "hf", "factory", "features"] = "bundle"
    bundle_path: Path | None = None  # source bundle: a bundle directory; null = demo bundle
    image: HFImage | None = None  # source hf: the image encoder (null = no image tokens)
    audio: HFAudio | None = None  # source hf: the audio encoder (null = no audio tokens)
    text: HFText | None = None  # source hf: the prompt encoder (null = no text tokens)
    aligner_path: Path | None = None  # source hf: safetensors of the aligner heads
    factory: str | None = None  # source factory: "pkg.module:function"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # source factory: its arguments
    features_path: Path | None = None  # source features: a features file

    @model_validator(mode="after")
    def _source_keys(self) -> Phase1:
        needs = {"bundle": set(), "hf": {"aligner_path"}, "factory": {"factory"},
                 "features": {"features_path"}}
        allowed = {"bundle": {"bundle_path"}, "hf": {"image", "audio", "text", "aligner_path"},
                   "factory": {"factory", "kwargs"}, "features": {"features_path"}}
        for key in needs[self.source]:
            if getattr(self, key) is None:
                raise ValueError(f"phase1.source {self.source} needs phase1.{key}")
        for key in set().union(*allowed.values()) - allowed[self.source]:
            if getattr(self, key) not in (None, {}):
                raise ValueError(f"phase1.{key} is not read with phase1.source "
                                 f"{self.source}; remove it or change the source")
        if self.source == "hf" and not (self.image or self.audio or self.text):
            raise ValueError("phase1.source hf needs at least one of image, audio, text")
        if self.factory is not None and not re.fullmatch(
                r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.factory):
            raise ValueError(f"phase1.factory {self.factory!r} is not 'package.module:function'")
        return self


class LoRA(_Strict):
    r: int = Field(8, ge=1)  # adapter rank
    alpha: float = Field(16.0, gt=0)  # scaling = alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    # Which LLM modules get an adapter, as peft reads it: a list matches module names equal
    # to an entry or ending in `.entry` ([c_proj] also hits GPT-2's mlp.c_proj); a string is
    # a regex over the whole module name (".*attn\.c_proj"); "all-linear" = every Linear
    # and Conv1D but the LM head. The run prints what it wrapped.
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ValueError(f"{value!r} is neither a list of module names nor a string "
                             "(a regex, or all-linear)")
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{value!r} is not a regular expression ({e}); write a "
                                 "list of module names, a regex, or all-linear") from None
            return value
        if not value or not all(name.strip() for name in value):
            raise ValueError("needs at least one non-empty module name (or a regex string, "
                             "or all-linear)")
        return value


class Projector(_Strict):
    hidden_dim: int | None = Field(None, ge=1)  # MLP width; null = 4 x LLM hidden size
    dropout: float = Field(0.0, ge=0, lt=1)


class Model(_Strict):
    llm_path: Path | None = None  # local HF model dir (from_pretrained); null = demo tiny LLM
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "cudagraphs"] = "off"
    # torch.compile the model's forward (reduce-overhead: Inductor's kernels in CUDA graphs);
    # the first steps pay the compile time. cudagraphs: torch's own kernels in CUDA graphs,
    # no Inductor (COMPILE_BACKENDS): a first compile of traces alone, for unfused kernels
    # and nothing kept for a warm start
    compile_scope: Literal["model", "layers"] = "model"  # model.compile over the whole forward,
    # or each LLM decoder block (one graph for all identical blocks), the rest eager
    compile_ahead: bool = False  # a trial group's first compile (when its compile cache
    # has none) made by a helper process while the members train eagerly
    # (trainer.compile_ahead); a solo run compiles in its own process
    run_empty_slots: bool = True  # a compiled trial group's step runs all its slots through
    # the LLM, empty ones too (static shapes); false: only as many as its members need, the
    # count a dynamic dimension of the one graph (trainer.group_slots.SlotTable.running;
    # compile_scope model only). True until measured on a GPU (docs/performance.md)
    compile_program: bool = False  # a compiled trial group also keeps its forward's traced
    # program in the compile cache (torch's AOT precompile), so a warm start skips Dynamo's
    # trace too (trainer.compile_program); compile_scope model. With compile_ahead the helper
    # traces and saves it, and the group loads it at the switch
    skip_compile_guards: bool = True  # a compiled forward skips TorchDynamo's guard check
    # (~2 ms of host time a call) on calls that repeat a warmed-up signature
    # (trainer.compile_guards); false checks every call
    cast_frozen_linears: bool = True  # bf16/fp16 runs store the frozen LLM linears that no
    # LoRA wraps (MLP, ~2/3 of a Qwen LLM) in that dtype: same outputs, half their memory
    lora: LoRA = Field(default_factory=LoRA)
    projector: Projector = Field(default_factory=Projector)

    @model_validator(mode="after")
    def _ahead_needs_compile(self) -> Model:
        if self.compile_ahead and self.compile == "off":
            raise ValueError("model.compile_ahead compiles ahead what model.compile compiles: "
                             "set model.compile (e.g. reduce-overhead) or compile_ahead: false")
        if self.compile in COMPILE_BACKENDS:
            clash = [f"{key}: {value}" for key, value, bad in (
                ("compile_scope", self.compile_scope, self.compile_scope != "model"),
                ("compile_ahead", "true", self.compile_ahead),
                ("compile_program", "true", self.compile_program)) if bad]
            if clash:
                # layers: one block graph replayed as a CUDA graph re-records for every
                # block's weights; ahead and program keep Inductor's artifacts, and this
                # backend makes none.
                raise ValueError(
                    f"model.compile: {self.compile} compiles the whole forward without "
                    f"Inductor, not with {', '.join(clash)}: set compile_scope: model, "
                    "compile_ahead: false and compile_program: false, or an Inductor mode "
                    "(e.g. compile: reduce-overhead)")
        if self.compile_program:
            clash = [f"{key}: {value}" for key, value, ok in (
                ("compile", self.compile, self.compile != "off"),
                ("compile_scope", self.compile_scope, self.compile_scope == "model")) if not ok]
            if clash:
                raise ValueError(
                    "model.compile_program keeps the program of a group forward compiled whole "
                    f"(compile set, compile_scope: model), not with {', '.join(clash)}: change "
                    "those or set compile_program: false")
        return self

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
            msg = clip(str(e["msg"]).removeprefix("Value error, "), 300)
            out.append(Problem(source, key, msg, "change the value"))
        else:
            # A bounded preview: the value may be an alias-expanded structure of thousands
            # of elements, or an int too long for str().
            got = preview(e.get("input"))
            out.append(Problem(source, key, f"{e['msg']} (got {got})",
                               f"fix the value, see {example} for an example"))
    return out


# Keys naming inputs a config points at. Written in a config file, a relative one is
# relative to that file's directory (so a config works from any working directory);
# given through --set, to the working directory. Output locations (output.root,
# output.assets_dir) stay relative to the working directory: runs land where you run.
INPUT_PATH_KEYS = ("phase1.bundle_path", "phase1.image.path", "phase1.audio.path",
                   "phase1.text.path", "phase1.aligner_path", "phase1.features_path",
                   "model.llm_path", "data.manifest", "data.eval_manifest")


def anchor_paths(data: dict[str, Any], base_dir: Path,
                 keys: tuple[str, ...] = INPUT_PATH_KEYS) -> dict[str, Any]:
    """Make the relative input paths (`keys`, dotted) in raw config data absolute under
    `base_dir`, the directory of the file they were written in. Also takes flat dotted
    keys (search.yaml's base.overrides). Values of the wrong type are left to validation."""
    base_dir = Path(base_dir).resolve()
    for dotted in keys:
        if isinstance(data.get(dotted), str):
            data[dotted] = _anchored(data[dotted], base_dir)
        node: Any = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(parts[-1]), str):
            node[parts[-1]] = _anchored(node[parts[-1]], base_dir)
    return data


def _anchored(value: str, base_dir: Path) -> str:
    if not value or "\0" in value or Path(value).expanduser().is_absolute():
        return value
    return str(base_dir / value)


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
    p1 = cfg.phase1
    p1.bundle_path = p1.bundle_path and p1.bundle_path.resolve()
    p1.aligner_path = p1.aligner_path and p1.aligner_path.resolve()
    p1.features_path = p1.features_path and p1.features_path.resolve()
    for enc in (p1.image, p1.audio, p1.text):
        if enc is not None:
            enc.path = enc.path.resolve()
    cfg.model.llm_path = cfg.model.llm_path and cfg.model.llm_path.resolve()
    cfg.data.manifest = cfg.data.manifest and cfg.data.manifest.resolve()
    cfg.data.eval_manifest = cfg.data.eval_manifest and cfg.data.eval_manifest.resolve()
    cfg.output.root = cfg.output.root.resolve()
    cfg.output.assets_dir = cfg.output.assets_dir and cfg.output.assets_dir.resolve()
    return cfg


def _check_paths(cfg: TrainConfig, source: str) -> list[Problem]:
    problems = []
    p1 = cfg.phase1
    for key, p in (("phase1.bundle_path", p1.bundle_path), ("model.llm_path", cfg.model.llm_path),
                   *((f"phase1.{m}.path", getattr(p1, m) and getattr(p1, m).path)
                     for m in ("image", "audio", "text"))):
        if p is not None and not p.is_dir():
            problems.append(Problem(source, key, f"directory {p} not found",
                                    "point it at a local directory, or null for the demo"))
    for key, p in (("phase1.aligner_path", p1.aligner_path),
                   ("phase1.features_path", p1.features_path)):
        if p is not None and not p.is_file():
            problems.append(Problem(source, key, f"file {p} not found",
                                    "point it at a safetensors file (docs/own-model.md)"))
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
    if data is None or data == {}:
        # Every key has a default, so an empty file would start a full run silently.
        raise ConfigError([Problem(str(path), "", "the config is empty",
                                   "write at least a `phase2:` block; configs/phase2.yaml "
                                   "is the demo's config")])
    if isinstance(data, dict):
        anchor_paths(data, Path(path).parent)
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return config_from_data(data, str(path))
