"""A shared group's make-up changes: what a member joining or leaving costs the group.

    python bench/group_join.py configs/reference.yaml --set demo.num_examples=64
    python bench/group_join.py configs/reference.yaml --set demo.num_examples=64 --device cuda

A sweep's group holds its step lock while a trial joins (its member built) or leaves (its
final weights and summary written), so its other members wait; a sweep with ASHA has one
of each per trial. For each arm, a fresh `trainer.group.TrialGroup` (slots `--k`) loads
the frozen LLM, takes `--k` members, then `--churn` times loses one and takes another,
and every join and leave is timed (with a device sync after it):
  per-join: every join reads its train and eval splits from the feature cache again (the
            old `prepare_run_dir`; a subclass whose `member_splits` loads each time);
  shared:   `TrialGroup` as it is: the first join's splits serve every later member.
Prints each arm's median join (the first excluded: it is the same in both) and leave, and
the ratio of the median joins, shared / per-join.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.data import Split  # noqa: E402
from trainer.group import TrialGroup  # noqa: E402
from trainer.inputs import load_splits, prepare_inputs  # noqa: E402


class PerJoinSplits(TrialGroup):
    """The baseline: every member's join loads its splits anew."""

    def member_splits(self, cfg: TrainConfig) -> tuple[Split, Split | None]:
        return load_splits(cfg, self.inputs, self.tokenizer)


def _timed(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_arm(kind: type[TrialGroup], cfg: TrainConfig, inputs, args, work: Path) -> dict:
    group = kind(inputs, device=args.device, log=lambda *_: None, slots=args.k)
    group.load_shared_llm(cfg)
    n = 0

    def join() -> float:
        nonlocal n
        member = cfg.model_copy(deep=True)
        member.phase2.seed = n
        member.output.root = work
        member.output.run_name = f"m{n}"
        n += 1
        return _timed(lambda: group.add_member(f"m{n - 1}", member), args.device)

    joins = [join() for _ in range(args.k)]
    leaves = []
    for i in range(args.churn):
        leaves.append(_timed(lambda i=i: group.remove_member(f"m{i}"), args.device))
        joins.append(join())
    return {"first_join_s": round(joins[0], 3),
            "join_s_median": round(statistics.median(joins[1:]), 3),
            "leave_s_median": round(statistics.median(leaves), 3) if leaves else None,
            "joins": len(joins), "leaves": len(leaves)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--k", type=int, default=8, help="the group's slots (members at once)")
    ap.add_argument("--churn", type=int, default=8, help="leaves, each followed by a join")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    inputs = prepare_inputs(cfg, log=lambda *_: None)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in (("per-join", PerJoinSplits), ("shared", TrialGroup)):
            rows[name] = run_arm(kind, cfg, inputs, args, Path(tmp) / name)
            print(json.dumps({"arm": name, **rows[name]}), flush=True)
            if args.device == "cuda":  # the arm's group is gone: its memory goes back
                torch.cuda.empty_cache()
    ratio = rows["shared"]["join_s_median"] / rows["per-join"]["join_s_median"]
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "k": args.k, "arms": rows, "join_ratio_shared_vs_per_join": round(ratio, 3)}
    print(f"median join, shared / per-join: {ratio:.3f}x "
          f"({rows['shared']['join_s_median']:.3f}s vs {rows['per-join']['join_s_median']:.3f}s); "
          f"median leave {rows['shared']['leave_s_median']}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
