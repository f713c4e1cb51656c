"""Config loading: the seed's YAML examples, strict YAML, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trainer.config import anchor_paths, config_from_data, load_config
from trainer.errors import ConfigError
from trainer.yaml_io import load_yaml_file, parse_yaml

# The seed's four examples, verbatim (phase2-differential-lr.md).
SEED_AUTO = """\
phase2:
  learning_rate: 0.0001  # 基础学习率 1e-4
  # projector_lr 自动设置为 5e-4 (5x base)
  # lora_lr 自动设置为 5e-5 (0.5x base)
"""
SEED_MANUAL = """\
phase2:
  learning_rate: 0.0001    # 基础学习率
  projector_lr: 0.0005     # 投影头学习率 (手动指定)
  lora_lr: 0.00005         # LoRA学习率 (手动指定)
"""
SEED_NAN = """\
learning_rate: 0.00005  # 5e-5 (降低基础学习率)
# projector_lr: 2.5e-4 (自动)
# lora_lr: 2.5e-5 (自动)
gradient_clip_val: 0.5  # 添加梯度裁剪
"""
SEED_SLOW = """\
learning_rate: 0.0002  # 2e-4 (提高基础学习率)
# projector_lr: 1e-3 (自动)
# lora_lr: 1e-4 (自动)
warmup_steps: 100  # 减少warmup步数
"""
SEED_INITIAL = """\
learning_rate: 0.0001  # 1e-4
# projector_lr: 5e-4 (自动)
# lora_lr: 5e-5 (自动)
epochs: 3
batch_size: 2
"""


@pytest.mark.parametrize(
    ("text", "base", "proj", "lora", "clip", "warmup"),
    [
        (SEED_AUTO, 1e-4, 5e-4, 5e-5, None, 500),
        (SEED_MANUAL, 1e-4, 5e-4, 5e-5, None, 500),
        (SEED_NAN, 5e-5, 2.5e-4, 2.5e-5, 0.5, 500),
        (SEED_SLOW, 2e-4, 1e-3, 1e-4, None, 100),
        (SEED_INITIAL, 1e-4, 5e-4, 5e-5, None, 500),
    ],
    ids=["auto", "manual", "nan", "slow", "initial"],
)
def test_seed_examples_resolve_to_the_seed_lrs(tmp_path, text, base, proj, lora, clip, warmup):
    path = tmp_path / "seed.yaml"
    path.write_text(text, encoding="utf-8")
    p2 = load_config(path).phase2
    assert math.isclose(p2.learning_rate, base)
    assert math.isclose(p2.resolved_projector_lr, proj)
    assert math.isclose(p2.resolved_lora_lr, lora)
    assert p2.clip == clip
    assert p2.warmup_steps == warmup
    assert (p2.epochs, p2.batch_size) == (3, 2)  # the seed's defaults


def test_explicit_lr_overrides_multiplier():
    p2 = config_from_data({"phase2": {"learning_rate": 1e-4, "projector_lr_mult": 10,
                                      "lora_lr": 3e-5}}).phase2
    assert math.isclose(p2.resolved_projector_lr, 1e-3)
    assert math.isclose(p2.resolved_lora_lr, 3e-5)


def test_scientific_notation_without_dot_is_a_float():
    assert parse_yaml("lr: 1e-4")["lr"] == pytest.approx(1e-4)
    assert isinstance(parse_yaml("x: 5E3")["x"], float)
    assert parse_yaml("v: 1.0.2")["v"] == "1.0.2"  # versions stay strings


def test_duplicate_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("phase2:\n  learning_rate: 1e-4\n  learning_rate: 2e-4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'learning_rate' \(first at line 2\)"):
        load_config(path)


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("phase2:\n  learning_rate: [1e-4\n  epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}:3:" in str(e.value)


def test_unknown_key_suggests_the_nearest_name(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("phase2:\n  learning_rat: 1e-4\n  warmup_step: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = e.value.lines()
    assert len(lines) == 2  # collected, not first-only
    assert "phase2.learning_rat: unknown key (did you mean 'learning_rate'?)" in lines[0]
    assert "did you mean 'warmup_steps'?" in lines[1]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"phase2": {"learning_rate": 0}}, "phase2.learning_rate"),
        ({"phase2": {"learning_rate": -1e-4}}, "phase2.learning_rate"),
        ({"phase2": {"precision": "fp8"}}, "phase2.precision"),
        ({"phase2": {"nan_policy": "ignore"}}, "phase2.nan_policy"),
        ({"phase2": {"batch_size": 0}}, "phase2.batch_size"),
        ({"output": {"run_name": "../escape"}}, "output"),
        ({"data": {"manifest": "/nonexistent/manifest.jsonl"}}, "data.manifest"),
        ({"phase1": {"bundle_path": "/nonexistent/bundle"}}, "phase1.bundle_path"),
        ({"learning_rate": 1e-4, "phase2": {}}, "learning_rate"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        config_from_data(data, "x.yaml")
    assert any(line.startswith(f"x.yaml: {key}") for line in e.value.lines()), e.value.lines()


def test_alias_bomb_is_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n"
        for p, c in zip("abcdefghijkl", "bcdefghijklm", strict=True))
    with pytest.raises(ConfigError, match="alias"):
        parse_yaml(bomb)


def test_huge_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("phase2:\n" + "  # padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_shipped_configs_validate():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        data = parse_yaml(path.read_text(), str(path))
        if "phase2" in data and "search" not in data and "sweep" not in data:
            config_from_data(data, str(path))


def test_overrides_parse_like_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("phase2:\n  learning_rate: 1e-4\n")
    cfg = load_config(path, ["phase2.learning_rate=3e-4", "phase2.gradient_clip_val=null",
                             "model.lora.r=4"])
    assert cfg.phase2.learning_rate == pytest.approx(3e-4)
    assert cfg.phase2.clip is None and cfg.model.lora.r == 4
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["phase2.learning_rate"])


def test_config_error_survives_copy_and_pickle():
    import copy
    import pickle

    from trainer.errors import Problem

    err = ConfigError([Problem("a.yaml", "phase2.x", "bad", "fix it")])
    for clone in (copy.copy(err), pickle.loads(pickle.dumps(err))):
        assert clone.lines() == err.lines() == ["a.yaml: phase2.x: bad (fix it)"]


def test_override_into_a_null_section_creates_it(tmp_path):
    from tuning.search_config import load_search

    path = tmp_path / "s.yaml"
    path.write_text("base:\n  overrides:\n    phase2: null\n    phase2.epochs: 2\n"
                    "space:\n  learning_rate: 0.001\n")
    assert load_search(path).base.phase2.epochs == 2


def test_yaml_off_and_on_are_compile_modes(tmp_path):
    """`compile: off` parses as a YAML 1.1 boolean in most tools: it means the mode."""
    from trainer.config import config_from_data

    assert config_from_data({"model": {"compile": False}}, "x.yaml").model.compile == "off"
    assert config_from_data({"model": {"compile": True}}, "x.yaml").model.compile == "default"
    with pytest.raises(ConfigError):
        config_from_data({"model": {"compile": "fast"}}, "x.yaml")


def test_empty_config_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "{}\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="the config is empty"):
            load_config(path)


def test_input_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "train.jsonl").write_text("")
    (tmp_path / "cfg" / "run.yaml").write_text(
        "phase2:\n  epochs: 1\ndata:\n  manifest: data/train.jsonl\noutput:\n  root: runs\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: the manifest is still found beside the config
    cfg = load_config(tmp_path / "cfg" / "run.yaml")
    assert cfg.data.manifest == tmp_path / "cfg" / "data" / "train.jsonl"
    assert cfg.output.root == tmp_path / "runs"  # outputs: relative to the working directory


def test_phase1_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    # A Phase 1 of Hugging Face encoders or precomputed features, written beside the config:
    # found from any working directory, like the manifest.
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "run.yaml").write_text(
        "phase2:\n  epochs: 1\nphase1:\n  source: hf\n  image: {path: enc/clip}\n"
        "  audio: {path: enc/whisper}\n  text: {path: enc/bert}\n"
        "  aligner_path: enc/aligner.safetensors\n")
    (cfg_dir / "feats.yaml").write_text(
        "phase2:\n  epochs: 1\nphase1:\n  source: features\n"
        "  features_path: feats.safetensors\n")
    monkeypatch.chdir(tmp_path)
    for name, want in (("run.yaml", {"image": "enc/clip", "audio": "enc/whisper",
                                     "text": "enc/bert", "aligner": "enc/aligner.safetensors"}),
                       ("feats.yaml", {"features": "feats.safetensors"})):
        data = load_yaml_file(cfg_dir / name)
        anchor_paths(data, cfg_dir)
        p1 = data["phase1"]
        got = {"image": p1.get("image", {}).get("path"), "audio": p1.get("audio", {}).get("path"),
               "text": p1.get("text", {}).get("path"), "aligner": p1.get("aligner_path"),
               "features": p1.get("features_path")}
        for key, rel in want.items():
            assert got[key] == str(cfg_dir.resolve() / rel), (name, key, got[key])


def test_search_base_config_is_relative_to_search_yaml(tmp_path, monkeypatch):
    from tuning.search_config import load_search

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    loaded = load_search(root / "configs" / "search.yaml")  # base.config: phase2.yaml
    assert loaded.base.phase2.epochs == 2


def test_value_previews_are_bounded():
    from trainer.yaml_io import preview

    assert len(preview(list(range(100_000)))) <= 80
    assert "an integer of about" in preview(10**4999)
    with pytest.raises(ConfigError) as err:
        config_from_data({"phase2": {"learning_rate": [[list(range(1000))] * 50] * 50}})
    assert all(len(line) < 400 for line in err.value.lines())


def _unwritable(tmp_path):
    """A read-only directory: chmod for a normal user; root ignores modes, so a read-only
    tmpfs (skipped where mounting is not allowed)."""
    import os
    import subprocess

    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path, lambda: path.chmod(0o755)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    return path, lambda: subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("where", ["file", "read-only"])
@pytest.mark.parametrize("cli", ["trainer", "sweep"])
def test_storage_that_cannot_be_written_is_one_line(tmp_path, capsys, cli, where):
    from trainer.__main__ import main as train_main
    from tuning.sweep import main as sweep_main

    undo = lambda: None  # noqa: E731
    if where == "file":
        target = tmp_path / "a-file"
        target.write_text("x")
    else:
        target, undo = _unwritable(tmp_path)
    try:
        if cli == "trainer":
            path = tmp_path / "run.yaml"
            path.write_text(f"phase2:\n  epochs: 1\noutput:\n  root: {target}/runs\n")
            rc = train_main([str(path)])
        else:
            path = tmp_path / "search.yaml"
            path.write_text(f"sweep:\n  storage_path: {target}/sweeps\n"
                            "space:\n  learning_rate: 0.001\n")
            rc = sweep_main([str(path), "--dry-run"])
    finally:
        undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    key = "output.root" if cli == "trainer" else "sweep.storage_path"
    assert err[0].startswith(f"error: {path}: {key}: {target}")
    assert ("is a file" if where == "file" else "is not writable") in err[0]


def test_disk_full_is_one_line_for_both_clis(tmp_path, capsys, monkeypatch):
    import errno

    import trainer.loop
    import tuning.sweep
    from trainer.__main__ import main as train_main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))

    monkeypatch.setattr(trainer.loop, "train", full)
    path = tmp_path / "run.yaml"
    path.write_text(f"phase2:\n  epochs: 1\noutput:\n  root: {tmp_path}/runs\n")
    assert train_main([str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the disk is full (writing" in line and "--resume" in line

    monkeypatch.setattr(tuning.sweep, "run_sweep", full)
    monkeypatch.setattr(tuning.sweep, "check_runs", lambda loaded: None)
    search = tmp_path / "search.yaml"
    search.write_text(f"sweep:\n  storage_path: {tmp_path}/sweeps\n"
                      "space:\n  learning_rate: 0.001\n")
    assert tuning.sweep.main([str(search)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path}/sweeps/phase2-sweep: the disk is full")
    assert "rerun the same command to resume" in line
