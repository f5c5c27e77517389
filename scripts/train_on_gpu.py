"""Train within a wall-clock budget, with the learning-rate schedule fitted to it (for time-boxed GPU machines).

    python scripts/train_on_gpu.py --seconds 240 --out runs/bundled -- --data data/photos --preset small ...

1. Checks the fused CUDA training_sample and reverse_step against the reference (in a subprocess with a
   timeout); if they disagree or hang, training runs on the reference ops (SVNR_FAST_BACKEND=reference).
2. `svnr train ARGS --steps 1000000 --stop-at CALIBRATION`: the warm-up phase, whose learning rates do not
   depend on the total step count; the log gives the steady-state it/s.
3. `svnr train --resume --steps N`, N chosen so that the cosine decay ends when the budget does (with
   `--max-minutes` as a safety net).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CALIBRATION_STEPS = 300
START_UP_S = 40          # process start, data workers, cuDNN autotuning and the first held-out evaluation
SAFETY = 0.92

FUSED_CHECK = """
import torch
from svnr_fast import Schedule, ops, reference
table = Schedule().table.cuda()
x0 = torch.rand(4, 3, 96, 80, device="cuda")
eps = torch.randn(2, *x0.shape, device="cuda")
args = (x0, torch.tensor([0.01, 0.05, 0.1, 0.2], device="cuda"), 0.1, torch.rand(4, device="cuda"), table)
fused = ops.training_sample(*args, eps_T=eps[0], eps_prime=eps[1])
ref = reference.training_sample(*args, eps_T=eps[0], eps_prime=eps[1])
for a, b in zip(fused, ref):
    assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6, (a - b).abs().max()
x_new, tau_new = ops.reverse_step(x0, eps[0], fused.tau, 1.0, table, z=eps[1])
x_ref, tau_ref = reference.reverse_step(x0, eps[0], fused.tau, 1.0, table, z=eps[1])
assert (x_new - x_ref).abs().max() <= 1e-5 and torch.equal(tau_new, tau_ref)
ops.training_sample(*args, seed=1)          # the in-kernel noise path must finish
torch.cuda.synchronize()
print("fused CUDA ops agree with the reference")
"""


def fused_ops_work() -> bool:
    try:
        result = subprocess.run([sys.executable, "-c", FUSED_CHECK], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        print("fused CUDA ops: check timed out; training on the reference ops", flush=True)
        return False
    print((result.stdout + result.stderr).strip()[-2000:], flush=True)
    return result.returncode == 0


def steady_rate(log: Path) -> float:
    """it/s between the last two logged steps (start-up excluded)."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    timed = [r for r in records if "elapsed_s" in r]
    (s1, t1), (s2, t2) = [(r["step"], r["elapsed_s"]) for r in timed[-2:]]
    return (s2 - s1) / (t2 - t1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock budget of the whole training")
    parser.add_argument("--out", type=Path, required=True, help="the run folder")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of svnr train")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    deadline = time.monotonic() + args.seconds
    env = dict(os.environ)
    if not fused_ops_work():
        env["SVNR_FAST_BACKEND"] = "reference"
    svnr = [sys.executable, "-m", "svnr_fast.app.cli", "train", "--out", str(args.out), "--device", "cuda", "--no-progress"]

    def minutes_left() -> float:
        return max(deadline - time.monotonic(), 1.0) / 60

    subprocess.run(svnr + train_args + ["--steps", "1000000", "--stop-at", str(CALIBRATION_STEPS),
                                        "--max-minutes", f"{minutes_left():.2f}"], env=env, check=True)
    rate = steady_rate(args.out / "log.jsonl")
    remaining_s = deadline - time.monotonic() - START_UP_S
    total = CALIBRATION_STEPS + max(int(rate * remaining_s * SAFETY), 100)
    print(f"calibration: {rate:.1f} it/s; planning {total} steps in all ({remaining_s:.0f} s left)", flush=True)
    subprocess.run(svnr + ["--resume", "--steps", str(total), "--max-minutes", f"{minutes_left():.2f}"],
                   env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
