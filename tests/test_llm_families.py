"""Any causal LM from a local dir: Llama, Qwen2, GPT-2 and GPT-NeoX, each a tiny random
model saved with save_pretrained next to the demo's offline character tokenizer, trained
for a few steps through the trainer; LoRA targets as peft reads them; bad LLM dirs and
targets are one line, with nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, tiny_data
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Qwen2Config,
)

from trainer.config import LoRA, config_from_data
from trainer.demo_assets import build_char_tokenizer
from trainer.errors import ConfigError
from trainer.llm import load_tokenizer, meta_llm, plan_lora, prepare_llm
from trainer.loop import train
from trainer.metrics import MemorySink
from trainer.model import add_lora, cast_untargeted_linears, lora_target_names, wrapped_modules
from trainer.yaml_io import load_yaml_file

WIDTH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
SPECIAL = dict(bos_token_id=1, eos_token_id=2)
# family: (config class, its sizes, whether its tokenizer has a pad token (GPT-2-style
# tokenizers do not), the targets a user would write, the wrapped-module pattern printed)
FAMILIES: dict[str, tuple[Any, dict[str, Any], bool, list[str] | str, str]] = {
    "llama": (LlamaConfig, dict(WIDTH, num_key_value_heads=2, pad_token_id=0), True,
              ["q_proj", "k_proj", "v_proj", "o_proj"], "model.layers.*.self_attn.q_proj x2"),
    "qwen2": (Qwen2Config, dict(WIDTH, num_key_value_heads=2, pad_token_id=0), True,
              ["q_proj", "v_proj"], "model.layers.*.self_attn.v_proj x2"),
    "gpt2": (GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256), False,
             ["c_attn"], "transformer.h.*.attn.c_attn x2"),
    "gpt_neox": (GPTNeoXConfig, dict(WIDTH, max_position_embeddings=256), False,
                 "all-linear", "gpt_neox.layers.*.mlp.dense_4h_to_h x2"),
}


def save_tiny_llm(family: str, directory: Path, *, pad: bool | None = None,
                  tokenizer: bool = True) -> Path:
    """A random-init tiny model of `family` plus the demo's character tokenizer, saved."""
    cls, sizes, has_pad, _, _ = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    tok_dir = directory if tokenizer else directory / "_tok"
    build_char_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if not (has_pad if pad is None else pad):
        tok.pad_token = None  # GPT-2 style: EOS, no pad
        tok.save_pretrained(str(tok_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(vocab_size=len(tok), **sizes, **SPECIAL))
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llms")
    return {f: save_tiny_llm(f, root / f) for f in FAMILIES}


def family_config(tmp_path: Path, assets: Path, llm_dir: Path, targets: list[str] | str,
                  run_name: str = "run"):
    data = tiny_data(tmp_path / "runs", assets, total_training_steps=3, warmup_steps=1)
    data["model"] = {"llm_path": str(llm_dir), "lora": {"target_modules": targets}}
    data["output"]["run_name"] = run_name
    return config_from_data(data, "family.yaml")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_through_the_trainer(family, llm_dirs, tmp_path, assets_dir):
    _, _, has_pad, targets, pattern = FAMILIES[family]
    cfg = family_config(tmp_path, assets_dir, llm_dirs[family], targets)
    logs: list[str] = []
    sink = MemorySink()
    summary = train(cfg, sink, console=False, log=logs.append)

    assert summary.status == "completed" and summary.steps_done == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in sink.records)
    assert all(r["grad_norm/lora"] > 0 for r in sink.records)  # the adapters train
    wrapped = next(line for line in logs if line.startswith("[lora] wraps"))
    assert pattern in wrapped, wrapped
    lora_line = next(line for line in logs if line.startswith("[optim]"))
    count = re.search(r"([\d,]+) trainable LoRA params", wrapped).group(1)
    assert f"lora: {count} params" in lora_line  # the printed count is what trains
    assert any("no pad token" in line for line in logs) == (not has_pad)
    run_dir = cfg.output.root / "run"
    resolved = load_yaml_file(run_dir / "config.resolved.yaml")["model"]
    assert resolved["llm_path"] == str(llm_dirs[family]) and resolved["lora"]["target_modules"]
    weights = load_file(str(run_dir / "trainable.safetensors"))
    assert any("lora_A" in k for k in weights)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", [["c_proj", "dense", "o_proj"], r".*\.(c_attn|v_proj|fc1)",
                                     "all-linear", ["lm_head", "q_proj"]])
def test_target_names_are_what_peft_wraps(family, targets, llm_dirs):
    """lora_target_names (which cast_untargeted_linears and the trial group rely on) names
    exactly the modules peft wraps: list suffixes, a full-name regex, and all-linear."""
    lm = meta_llm(llm_dirs[family])
    names = lora_target_names(lm, targets)
    if not names:
        return  # this family has none of these names: plan_lora's error (tested below)
    assert sorted(wrapped_modules(add_lora(lm, 4, 8.0, 0.0, targets))) == sorted(names)


def test_gpt2_c_proj_wraps_the_mlp_too_and_a_regex_can_say_which(llm_dirs):
    plan = plan_lora(meta_llm(llm_dirs["gpt2"]), LoRA(r=4, target_modules=["c_proj"]))
    assert sorted(plan.wrapped) == [f"transformer.h.{i}.{p}.c_proj"
                                    for i in (0, 1) for p in ("attn", "mlp")]
    assert ("transformer.h.*.attn.c_proj x2, transformer.h.*.mlp.c_proj x2"
            in plan.describe(4))
    attn = plan_lora(meta_llm(llm_dirs["gpt2"]), LoRA(r=4, target_modules=r".*attn\.c_proj"))
    assert attn.wrapped == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    # r x (in + out) per wrapped layer: attn.c_proj 32 -> 32, mlp.c_proj 4 x 32 -> 32
    assert attn.lora_params == 2 * 4 * (32 + 32)
    assert plan.lora_params == attn.lora_params + 2 * 4 * (128 + 32)
    every = plan_lora(meta_llm(llm_dirs["gpt2"]), LoRA(r=4, target_modules="all-linear"))
    assert len(every.wrapped) == 8 and not any("lm_head" in n for n in every.wrapped)


def _one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    lines = err.value.lines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_target_matching_nothing_names_the_modules_that_exist(llm_dirs):
    with pytest.raises(ConfigError) as err:
        plan_lora(meta_llm(llm_dirs["gpt2"]), LoRA(), "g.yaml")
    line = _one_line(err)
    assert line.startswith("g.yaml: model.lora.target_modules: [q_proj, k_proj, v_proj, o_proj]"
                           " matches no module of GPT2LMHeadModel")
    assert "c_attn, c_proj, c_fc" in line and "all-linear" in line
    with pytest.raises(ConfigError) as err:  # a bare name as a string is a regex: says so
        plan_lora(meta_llm(llm_dirs["gpt2"]), LoRA(target_modules="c_attn"), "g.yaml")
    assert "regex over the whole module name, e.g. '.*\\.c_attn'" in _one_line(err)
    with pytest.raises(ConfigError) as err:  # a decoder block is no layer LoRA can wrap
        plan_lora(meta_llm(llm_dirs["llama"]), LoRA(target_modules=r"model\.layers\.0"))
    assert "model.layers.0 (LlamaDecoderLayer), which LoRA cannot wrap" in _one_line(err)


def test_gpt2_with_default_targets_exits_2_in_one_line_and_writes_nothing(
        llm_dirs, tmp_path, assets_dir):
    config = tmp_path / "gpt2.yaml"
    config.write_text(f"model:\n  llm_path: {llm_dirs['gpt2']}\n")
    root = tmp_path / "runs"
    res = subprocess.run(
        [sys.executable, "-m", "trainer", str(config), "--set", f"output.root={root}",
         "--set", f"output.assets_dir={assets_dir}", "--set", "output.run_name=r",
         "--set", "demo.num_examples=48", "--set", "demo.llm.pretrain_steps=100"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {config}: model.lora.target_modules: "), res.stderr
    assert "c_attn" in errors[0] and "Traceback" not in res.stderr
    assert not root.exists()  # no run dir, no config.resolved.yaml


def test_a_dir_without_tokenizer_files_names_what_is_missing(tmp_path, assets_dir):
    bare = save_tiny_llm("llama", tmp_path / "bare", tokenizer=False)
    cfg = family_config(tmp_path, assets_dir, bare, ["q_proj"])
    with pytest.raises(ConfigError) as err:
        train(cfg, console=False, log=lambda *_: None)
    line = _one_line(err)
    assert f"model.llm_path: {bare} has no tokenizer files (none of tokenizer.json" in line
    assert "it holds: _tok, config.json, generation_config.json, model.safetensors" in line
    assert "tokenizer.save_pretrained" in line
    assert not (tmp_path / "runs").exists()
    (bare / "vocab.json").write_text("{}")  # half a BPE tokenizer: the other half is named
    with pytest.raises(ConfigError, match=r"has vocab\.json but no merges\.txt"):
        load_tokenizer(bare)


def test_missing_pad_token_pads_with_eos_and_says_so(llm_dirs):
    logs: list[str] = []
    tok = prepare_llm(llm_dirs["gpt2"], LoRA(target_modules=["c_attn"]), log=logs.append)
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert logs[0] == ("[llm] the tokenizer has no pad token: padding with its EOS token "
                       "'</s>' (id 2); padding is never a target")
    from trainer.data import Example, tokenize

    rows = [Example(id=str(i), image=Path("x"), audio=Path("x"), prompt=p, target="a")
            for i, p in enumerate(("hi", "a longer prompt"))]
    tokens = tokenize(rows, tok, 32, 32)  # a TypeError inside data.py before
    assert tokens.input_ids[0, -1] == 2 and tokens.attention_mask[0, -1] == 0


def test_no_eos_and_too_small_an_embedding_are_refused(tmp_path, llm_dirs):
    d = save_tiny_llm("qwen2", tmp_path / "noeos")
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.eos_token = None
    tok.save_pretrained(str(d))
    with pytest.raises(ConfigError, match="has no EOS token"):
        load_tokenizer(d)
    small = tmp_path / "small"
    model = AutoModelForCausalLM.from_pretrained(str(llm_dirs["llama"]))
    model.resize_token_embeddings(50)
    model.save_pretrained(str(small))
    AutoTokenizer.from_pretrained(str(llm_dirs["llama"])).save_pretrained(str(small))
    with pytest.raises(ConfigError, match=r"has 99 tokens, the model's embedding only 50"):
        prepare_llm(small, LoRA())


def test_cast_untargeted_linears_casts_gpt2_conv1d_exactly(llm_dirs):
    """GPT-2's dense layers are Conv1D (addmm), not nn.Linear: the untargeted ones are
    stored in bf16 too, and bf16 autocast gives bit-identical logits either way."""
    lm = AutoModelForCausalLM.from_pretrained(str(llm_dirs["gpt2"]))
    ids = torch.randint(4, 90, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = lm(ids).logits
    cast_untargeted_linears(lm, ["c_attn"], torch.bfloat16)
    dtypes = {n: p.dtype for n, p in lm.named_parameters()}
    assert dtypes["transformer.h.0.mlp.c_fc.weight"] == torch.bfloat16
    assert dtypes["transformer.h.1.attn.c_proj.weight"] == torch.bfloat16
    assert dtypes["transformer.h.0.attn.c_attn.weight"] == torch.float32  # LoRA-wrapped
    assert dtypes["transformer.wte.weight"] == torch.float32  # the (tied) head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(lm(ids).logits, before)


@pytest.mark.parametrize("value, message", [
    ("(", "is not a regular expression"),
    ([], "needs at least one non-empty module name"),
    (3, "neither a list of module names nor a string"),
])
def test_target_modules_config_accepts_list_regex_all_linear_only(value, message):
    for good in (["c_attn"], r".*\.c_attn", "all-linear"):
        assert config_from_data({"model": {"lora": {"target_modules": good}}}) \
            .model.lora.target_modules == good
    with pytest.raises(ConfigError) as err:
        config_from_data({"model": {"lora": {"target_modules": value}}}, "c.yaml")
    assert message in _one_line(err) and "c.yaml: model.lora.target_modules" in _one_line(err)


def test_trainer_dry_run_checks_the_llm_and_its_targets(llm_dirs, tmp_path, capsys):
    from trainer.__main__ import main as trainer_main

    config = tmp_path / "gpt2.yaml"
    config.write_text(f"model:\n  llm_path: {llm_dirs['gpt2']}\n")
    root = tmp_path / "runs"
    common = [str(config), "--dry-run", "--set", f"output.root={root}"]
    assert trainer_main(common) == 2  # the default q/k/v/o_proj: nothing in GPT-2
    out = capsys.readouterr()
    [line] = out.err.splitlines()
    assert line.startswith(f"error: {config}: model.lora.target_modules: [q_proj, k_proj, "
                           "v_proj, o_proj] matches no module of GPT2LMHeadModel")
    assert "c_attn, c_proj, c_fc" in line and "Traceback" not in out.err + out.out
    assert trainer_main([*common, "--set", "model.lora.target_modules=[c_attn]"]) == 0
    out = capsys.readouterr().out
    assert "[llm] the tokenizer has no pad token: padding with its EOS token" in out
    assert "[lora] wraps 2 modules of GPT2LMHeadModel" in out and "dry run:" in out
    assert not root.exists()  # nothing trained, nothing written


def test_trainer_dry_run_checks_the_demo_llm_without_building_it(tmp_path, capsys):
    from trainer.__main__ import main as trainer_main

    assets = tmp_path / "assets"
    assets.mkdir()
    args = ["--dry-run", "--set", f"output.root={tmp_path / 'runs'}",
            "--set", f"output.assets_dir={assets}"]
    phase2 = str(ROOT / "configs" / "phase2.yaml")
    assert trainer_main([phase2, *args, "--set", "model.lora.target_modules=[c_attn]"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "[c_attn] matches no module of Qwen2ForCausalLM" in line and "q_proj" in line
    assert trainer_main([phase2, *args]) == 0
    assert "[lora] wraps 8 modules of Qwen2ForCausalLM" in capsys.readouterr().out
    assert list(assets.iterdir()) == []  # checked from its config: no LLM was built


def test_sweep_dry_run_checks_every_llm_target_the_space_can_sample(llm_dirs, tmp_path, capsys):
    from test_sweep import _write

    from tuning.sweep import main as sweep_main

    gpt2 = str(llm_dirs["gpt2"])
    bad = _write(tmp_path, space={"model.llm_path": gpt2,
                                  "model.lora.target_modules": {"grid": [["c_attn"],
                                                                         ["q_proj"]]}})
    assert sweep_main([str(bad), "--dry-run"]) == 2
    out = capsys.readouterr()
    [line] = out.err.splitlines()
    assert line.startswith(f"error: {bad}: space.model.llm_path={gpt2!r}, "
                           "space.model.lora.target_modules=['q_proj']: [q_proj] matches no "
                           "module of GPT2LMHeadModel"), line
    assert "[lora] wraps 2 modules of GPT2LMHeadModel" in out.out  # the good choice: shown
    good = _write(tmp_path, space={"model.llm_path": gpt2, "model.lora.target_modules": {
        "grid": [["c_attn"], "all-linear"]}})
    assert sweep_main([str(good), "--dry-run"]) == 0
    assert "[lora] wraps 8 modules of GPT2LMHeadModel" in capsys.readouterr().out  # all-linear
    assert not (tmp_path / "sweeps").exists()
