"""Time and peak memory of `svnr denoise` on one large photo for each tile size (one process per size).

    python benchmarks/tile_cost.py --photo data/photos/heldout/wallpaper-FallenLeaf.png --size 1500x1000 \
        --tiles 64 128 256 512 --out benchmarks/results/defaults/tile_cost.md

The photo is resized to --size, noised at (0.05, 0.10) and written as a 16-bit PNG; every tile size then
denoises it in a fresh `svnr denoise` process under /usr/bin/time (peak resident memory of the whole
process, model and photo included; wall time of the whole command). Extra options after `--` go to
svnr denoise (e.g. -- --steps 4 --eta 0).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photo", type=Path, required=True)
    parser.add_argument("--size", default="1500x1000", help="WIDTHxHEIGHT")
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--out", type=Path, required=True, help="markdown table")
    parser.add_argument("denoise_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    from svnr_fast import PoissonGaussian
    from svnr_fast.app import imageio
    from svnr_fast.app.data import load_rgb

    width, height = map(int, args.size.split("x"))
    clean = torch.nn.functional.interpolate(load_rgb(args.photo)[None], size=(height, width), mode="bicubic",
                                            antialias=True, align_corners=False).clamp(0, 1)
    noisy = PoissonGaussian(0.05, 0.10).sample(clean, generator=torch.Generator().manual_seed(0))[0]
    extra = [a for a in args.denoise_args if a != "--"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "noisy.png"
        imageio.write_image(source, noisy, bits=16)
        for tile in args.tiles:
            command = ["/usr/bin/time", "-v", sys.executable, "-m", "svnr_fast.app.cli", "denoise", str(source), "-o",
                       str(Path(folder) / "out.png"), "--overwrite", "--quiet", "--sigma-r", "0.05", "--sigma-s",
                       "0.1", "--tile", str(tile), *extra]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
            wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr)[1]
            seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
            denoise_seconds = float(re.search(r", ([\d.]+) s on", result.stdout)[1])
            rows.append((tile, peak_kb / 1e6, seconds, denoise_seconds))
            print(f"tile {tile}: peak {peak_kb / 1e6:.2f} GB, {seconds:.1f} s wall, {denoise_seconds:.1f} s denoising",
                  flush=True)
    lines = [f"`python benchmarks/tile_cost.py --photo {args.photo} --size {args.size} --tiles "
             f"{' '.join(map(str, args.tiles))} --out {args.out} -- {' '.join(extra)}`", "",
             f"{width}x{height} photo at (0.05, 0.10), svnr denoise {' '.join(extra)}, {torch.get_num_threads()} torch "
             "threads", "", "| tile | peak memory (GB) | wall time (s) | denoising (s) |", "|---:|---:|---:|---:|",
             *[f"| {t} | {m:.2f} | {w:.1f} | {d:.1f} |" for t, m, w, d in rows]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
