"""The README's defaults table, from the `svnr eval` runs under benchmarks/results/defaults/ (results.csv each).

    python benchmarks/defaults_table.py benchmarks/results/defaults

Rows: a (folder, method) per setting; columns: PSNR / SSIM / low-pass error per level, and the network
evaluations per photo (mean over the levels; time follows them: the runs shared a loaded 2-core CPU, so their
seconds are not comparable). Whole 256-px crops unless a tile size is named.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

LEVELS = ("0.02,0.05", "0.05,0.1", "0.1,0.2")
ROWS = (  # (label, folder, method)
    ("noisy photo (low-pass error: the noise's own)", "eval-eta0", "noisy"),
    ("library before: eta 1, ceil(max tau*) steps (the paper)", "eval-eta1", "svnr"),
    ("CLI before: eta 0, ceil(max tau*) steps", "eval-eta0", "svnr"),
    ("eta 0, 1 step", "eval-eta0", "svnr-1"),
    ("eta 0, 2 steps", "eval-eta0", "svnr-2"),
    ("eta 0, 4 steps", "eval-eta0", "svnr-4"),
    ("eta 0, 8 steps", "eval-eta0", "svnr-8"),
    ("eta 1, 4 steps", "eval-eta1", "svnr-4"),
    ("eta 1, 4 steps, low band 8", "eval-eta1-lowband8", "svnr-4"),
    ("eta 0, ceil(max tau*) steps, low band 8", "eval-eta0-lowband8", "svnr"),
    ("eta 0, 2 steps, low band 8", "eval-eta0-lowband8", "svnr-2"),
    ("eta 0, 4 steps, low band 8", "eval-eta0-lowband8", "svnr-4"),
    ("eta 0, 2 steps, low band 6", "eval-eta0-lowband6", "svnr-2"),
    ("eta 0, 4 steps, low band 6", "eval-eta0-lowband6", "svnr-4"),
    ("eta 0, 4 steps, low band 6, tiles of 128 px", "eval-eta0-lowband6-tile128", "svnr-4"),
    ("**the defaults: eta 0, 4 steps, low band 6, tiles of 64 px**", "eval-eta0-lowband6-tile64", "svnr-4"),
    ("NLM on the Anscombe transform", "eval-eta0", "nlm"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print("| setting | " + " | ".join(f"({level}) PSNR / SSIM / low-pass" for level in LEVELS) + " | NFE |")
    print("|---|" + "---|" * (len(LEVELS) + 1))
    for label, folder, method in ROWS:
        path = args.folder / folder / "results.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = {r["level"]: r for r in csv.DictReader(f) if r["method"] == method}
        if not rows:
            continue
        cells = [f"{float(rows[lv]['psnr']):.2f} / {float(rows[lv]['ssim']):.3f} / {float(rows[lv]['lowpass_error']):.5f}"
                 for lv in LEVELS]
        nfe = sum(float(rows[lv]["nfe"]) for lv in LEVELS) / len(LEVELS)
        print(f"| {label} | " + " | ".join(cells) + f" | {nfe:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
