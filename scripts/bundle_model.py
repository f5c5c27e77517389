"""Ship a trained model inside the package: weights stored as float16 (half the size; loaded back into
float32), the training record kept in the metadata.

    python scripts/bundle_model.py runs/bundled/best.safetensors svnr_fast/weights/svnr-small.safetensors

Prints the largest weight change float16 storage causes, relative to the weight's scale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from svnr_fast.app.checkpoint import (
    MODEL_FORMAT,
    atomic_save,
    load_model,
    read_safetensors,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a model file written by svnr train (best.safetensors)")
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    _, metadata = read_safetensors(args.source, MODEL_FORMAT)
    model = load_model(args.source)
    weights = model.state_dict()
    half = {name: value.to(torch.float16).contiguous() for name, value in weights.items()}
    worst = max(float((h.float() - w).abs().max() / w.abs().max().clamp_min(1e-12))
                for h, w in zip(half.values(), weights.values()))
    for name, value in weights.items():
        if value.abs().max() > torch.finfo(torch.float16).max:
            raise SystemExit(f"{name} does not fit float16")
    args.target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(half, {**metadata, "bundled_from": args.source.name, "storage_dtype": "float16"}, args.target)
    print(f"{args.target}: {args.target.stat().st_size / 1e6:.1f} MB, largest relative weight change {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
