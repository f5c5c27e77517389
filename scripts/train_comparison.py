"""Issue 7's comparison: three models trained the same way, then `svnr eval` on the held-out photos.

    python scripts/train_comparison.py --out runs/comparison --steps 3000 --device cuda \\
        --eval-out benchmarks/results/comparison-gpu -- --data data/photos --preset small --batch-size 64

trains, with the same data, preset, seed, batch and step budget (everything after `--` goes to each
`svnr train`):
  svnr       the paper's correlated scheme, `--time-map observed` (README, "Deviation": the time map of
             DESIGN.md §1.4 leaks the clean image to the network);
  ablation   `--no-correlation --time-map observed`: the same, with x_t's noise independent of y's;
  baseline   `--baseline`: the conventional conditional model with a scalar time;
then evaluates the final EMA weights of each (model.safetensors, not best.safetensors: the held-out photos
that pick "best" are the ones evaluated, and the baseline's single-step selection metric says little about
its 1000-step sampler). A run folder that already holds its final checkpoint is not trained again, so
an interrupted comparison continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = {
    "svnr": ["--time-map", "observed"],
    "ablation": ["--no-correlation", "--time-map", "observed"],
    "baseline": ["--baseline"],
}
EVAL_METHODS = "noisy svnr svnr-4 x0hat ablation ablation-4 baseline baseline-25 nlm"


def last_step(run: Path) -> int:
    log = run / "log.jsonl"
    if not log.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the three run folders")
    parser.add_argument("--steps", type=int, required=True, help="optimiser steps of every model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-minutes", type=float, default=None, help="safety limit per model")
    parser.add_argument("--eval-out", type=Path, required=True, help="where svnr eval writes its tables")
    parser.add_argument("--eval-args", default="", help="extra svnr eval arguments, e.g. '--levels 0.05,0.1'")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of svnr train")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    svnr = [sys.executable, "-m", "svnr_fast.app.cli"]

    for name, scheme_args in MODELS.items():
        run = args.out / name
        if last_step(run) >= args.steps and (run / "model.safetensors").exists():
            print(f"== {name}: already trained ({run})", flush=True)
            continue
        resume = ["--resume"] if (run / "checkpoint.safetensors").exists() else train_args + scheme_args
        limit = ["--max-minutes", str(args.max_minutes)] if args.max_minutes else []
        print(f"== training {name} for {args.steps} steps in {run}", flush=True)
        subprocess.run(svnr + ["train", "--out", str(run), "--steps", str(args.steps), "--device", args.device,
                               "--no-progress"] + resume + limit, check=True)

    short = {name: last_step(args.out / name) for name in MODELS}
    short = {name: step for name, step in short.items() if step < args.steps}
    if short:   # --max-minutes stopped them: the table below compares unequal budgets
        print("== WARNING: not at the same step budget: " + ", ".join(f"{name} stopped at step {step}" for name, step
              in short.items()) + f" of {args.steps}; run this command again to continue them", flush=True)
    if args.skip_eval:
        return 0
    data = next((train_args[i + 1] for i, a in enumerate(train_args[:-1]) if a == "--data"), "data/photos")
    command = svnr + ["eval", "--data", data, "--out", str(args.eval_out), "--device", args.device, "--quiet",
                      "--methods", *EVAL_METHODS.split(), "--eta", "0",
                      *[flag for name in MODELS for flag in (f"--{name}", str(args.out / name / "model.safetensors"))],
                      *args.eval_args.split()]
    print("== " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
