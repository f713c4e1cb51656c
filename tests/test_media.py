"""Media reading (any image size/mode; audio of any rate, channels, PCM width) and the
manifest checks made before anything trains (bad files, duplicate ids, empty targets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from trainer.data import check_media, read_manifest
from trainer.errors import ConfigError
from trainer.media import MediaError, read_audio, read_image
from trainer.phase1.contract import read_batch

RATE = 16000


def _sine(rate: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize("channels", [1, 2])
def test_audio_of_any_rate_width_and_channels_reads_as_mono_at_the_asked_rate(
        tmp_path, rate, subtype, channels):
    x = _sine(rate)
    path = tmp_path / "a.wav"
    soundfile.write(path, np.stack([x, x], 1) if channels == 2 else x, rate, subtype=subtype)
    y = read_audio(path, RATE)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - RATE // 2) <= 1
    ref = _sine(RATE)[: len(y)]
    # the same tone at the new rate (8-bit PCM is coarse; resampling's edges ring)
    mid = slice(400, len(y) - 400)
    assert np.abs(y[mid] - ref[mid]).max() < (0.02 if subtype == "PCM_U8" else 2e-3)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "CMYK"])
def test_images_of_any_mode_and_size_read_as_rgb(tmp_path, mode):
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    Image.new(mode, (37, 53)).save(path)
    im = read_image(path)
    assert im.mode == "RGB" and im.size == (37, 53)


def _manifest(tmp_path: Path, rows: list[dict]) -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    soundfile.write(tmp_path / "ok.wav", _sine(8000), 8000)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_duplicate_ids_are_refused_naming_both_lines(tmp_path):
    # Before this check the id-to-row map made the first row train on the second's features.
    path = _manifest(tmp_path, [
        {"id": "a", "image": "ok.png", "prompt": "p", "target": "first"},
        {"id": "b", "image": "ok.png", "prompt": "p", "target": "other"},
        {"id": "a", "audio": "ok.wav", "prompt": "p", "target": "second"},
    ])
    with pytest.raises(ConfigError) as e:
        read_manifest(path)
    [line] = e.value.lines()
    assert f"{path}:3: id: duplicate id 'a' (also on line 1)" in line


def test_empty_targets_and_rows_without_media_are_refused(tmp_path):
    path = _manifest(tmp_path, [
        {"id": "a", "image": "ok.png", "prompt": "p", "target": "  "},
        {"id": "b", "prompt": "p", "target": "t"},
        {"id": "c", "audio": "ok.wav", "prompt": "p", "target": "audio only is fine"},
    ])
    with pytest.raises(ConfigError) as e:
        read_manifest(path)
    lines = e.value.lines()
    assert len(lines) == 2
    assert f"{path}:1: target: empty target" in lines[0]
    assert f"{path}:2: image,audio: neither an image nor an audio file" in lines[1]


def test_corrupt_files_are_one_line_each_naming_file_and_manifest_line(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    path = _manifest(tmp_path, [
        {"id": "a", "image": "ok.png", "audio": "ok.wav", "prompt": "p", "target": "t"},
        {"id": "b", "image": "bad.png", "audio": "ok.wav", "prompt": "p", "target": "t"},
        {"id": "c", "image": "ok.png", "audio": "bad.wav", "prompt": "p", "target": "t"},
    ])
    examples = read_manifest(path)
    lines = [p.line() for p in check_media(examples)]  # the sweep's dry run: every bad file
    assert len(lines) == 2
    assert f"{path}:2: image: cannot read image {tmp_path / 'bad.png'}" in lines[0]
    assert f"{path}:3: audio: cannot read audio {tmp_path / 'bad.wav'}" in lines[1]
    with pytest.raises(ConfigError) as e:  # building the feature cache stops the same way
        read_batch(examples, RATE)
    assert [p.line() for p in e.value.problems] == lines
    with pytest.raises(MediaError):
        read_image(tmp_path / "bad.png")


def test_sweep_dry_run_reports_every_bad_media_file(tmp_path, capsys):
    from test_sweep import _write

    from tuning.sweep import main as sweep_main

    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    manifest = _manifest(tmp_path, [
        {"id": "a", "image": "bad.png", "audio": "ok.wav", "prompt": "p", "target": "t"},
        {"id": "b", "image": "ok.png", "audio": "bad.wav", "prompt": "p", "target": "t"},
        *({"id": f"ok{i}", "image": "ok.png", "prompt": "p", "target": "t"} for i in range(12)),
    ])
    path = _write(tmp_path, {"base.overrides.data.manifest": str(manifest)})
    assert sweep_main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "bad.png" in err[0] and "bad.wav" in err[1]
    assert all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "sweeps").exists()
