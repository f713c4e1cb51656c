"""`python -m trainer CONFIG [--set key=value ...] [--print-config] [--dry-run] [--resume]`."""

from __future__ import annotations

import argparse
import os
import sys

from trainer.errors import ConfigError, Problem


def _quiet_libraries(verbose: bool = False) -> None:
    # Progress bars and advisory warnings from transformers drown the run's own output.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    from trainer.noise import quiet_transformers

    quiet_transformers(verbose)


def _dry_run(cfg, source: str) -> int:
    """The checks that need no training; the plan on success (ConfigError otherwise)."""
    from trainer.dry_run import dry_run
    from trainer.inputs import train_size
    from trainer.plan import plan_steps

    dry_run(cfg, source)
    plan = plan_steps(cfg.phase2, train_size(cfg), source)
    print(f"dry run: {source} is ready ({plan.total_steps} optimizer steps, "
          f"phase1 source {cfg.phase1.source})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer", description="One Phase 2 run.")
    ap.add_argument("config", help="YAML config (a file holding only a `phase2:` block works)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key, e.g. --set phase2.learning_rate=2e-4 (repeatable)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the validated config (with resolved LRs) and exit")
    ap.add_argument("--count-params", action="store_true",
                    help="print parameter counts per component (meta device) and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the LLM, its LoRA targets and the media files, print the "
                         "plan and exit (nothing trained or written)")
    ap.add_argument("--resume", action="store_true",
                    help="continue output.run_name from its newest checkpoint")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    ap.add_argument("--verbose", action="store_true",
                    help="keep transformers' log lines and progress bars (silenced by default)")
    args = ap.parse_args(argv)
    try:
        from trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            from trainer.yaml_io import dump_yaml

            data = cfg.to_plain()
            data["phase2"]["projector_lr"] = cfg.phase2.resolved_projector_lr
            data["phase2"]["lora_lr"] = cfg.phase2.resolved_lora_lr
            print(dump_yaml(data), end="")
            return 0
        _quiet_libraries(args.verbose)
        if args.count_params:
            from trainer.param_count import count_parameters, format_counts

            print(format_counts(count_parameters(cfg)))
            return 0
        from trainer.fsutil import dir_problem, storage_error_line

        for key, where in (("output.root", cfg.output.root),
                           ("output.assets_dir", cfg.output.assets_dir)):
            why = where is not None and dir_problem(where)
            if why:
                raise ConfigError([Problem(args.config, key, why,
                                           "point it at a writable directory")])
        if args.dry_run:
            return _dry_run(cfg, args.config)
        from trainer.loop import train

        try:
            summary = train(cfg, resume=args.resume, device=args.device, source=args.config)
        except OSError as e:
            line = storage_error_line(e, cfg.output.root, "rerun with --resume and the same "
                                      "output.run_name to continue from the newest checkpoint")
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 2
    except ConfigError as e:
        for line in e.lines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume and the same output.run_name to continue "
              "from the newest checkpoint", file=sys.stderr)
        return 130
    print(f"run directory: {summary.run_dir}")
    return 0 if summary.status == "completed" else 1


if __name__ == "__main__":
    from trainer.process_exit import exit_after_handlers

    exit_after_handlers(main())
