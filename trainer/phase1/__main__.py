"""`python -m trainer.phase1 export CONFIG OUT [--set key=value ...] [--device cpu]`

Runs the config's Phase 1 (bundle, hf or factory) over its manifest (and eval
manifest) and writes the aligned features to OUT in the features-file format
(trainer.phase1.features_file), for `phase1: {source: features, features_path: OUT}`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.errors import ConfigError, Problem


def export(config: str, out: Path, overrides: list[str], device: str, force: bool) -> Path:
    from trainer.config import load_config
    from trainer.data import read_manifest
    from trainer.feature_cache import build_features
    from trainer.inputs import demo_manifest, phase1_source
    from trainer.phase1.features_file import write_features

    cfg = load_config(config, overrides)
    if cfg.phase1.source == "features":
        raise ConfigError([Problem(config, "phase1.source", "is features already",
                                   "export from a bundle, hf or factory Phase 1")])
    if out.exists() and not force:
        raise ConfigError([Problem(str(out), "", "exists", "pick a new path, or --force")])
    source = phase1_source(cfg)
    examples = read_manifest(cfg.data.manifest or demo_manifest(cfg, source))
    if cfg.data.eval_manifest is not None:
        seen = {e.id for e in examples}
        examples += [e for e in read_manifest(cfg.data.eval_manifest) if e.id not in seen]
    print(f"[export] {len(examples)} examples through the frozen Phase 1 ({source.name})",
          flush=True)
    data = build_features(source, examples, device)
    write_features(out, data)
    print(f"[export] wrote {out}: features {tuple(data.features.shape)}, "
          f"{int(data.mask.sum())} real tokens")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.phase1",
                                 description="Phase 1 tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a config's aligned features to a file")
    ex.add_argument("config", help="a Phase 2 config whose phase1: and data: to use")
    ex.add_argument("out", type=Path, help="the features file to write (.safetensors)")
    ex.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config key (repeatable)")
    ex.add_argument("--device", default="cpu", help="where the Phase 1 runs (cpu, cuda)")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    try:
        export(args.config, args.out, args.overrides, args.device, args.force)
    except ConfigError as e:
        for line in e.lines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
