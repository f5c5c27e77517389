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
    CHECKSUM_KEY,
    MODEL_FORMAT,
    atomic_save,
    load_model,
    read_safetensors,
)


def bundle(source: Path, target: Path) -> str:
    """Writes the model file `source` as float16 to `target`; returns what was done (size, largest change)."""
    _, metadata = read_safetensors(source, MODEL_FORMAT)
    model = load_model(source)
    weights = model.state_dict()
    for name, value in weights.items():
        if value.abs().max() > torch.finfo(torch.float16).max:
            raise SystemExit(f"{name} does not fit float16")
    half = {name: value.to(torch.float16).contiguous() for name, value in weights.items()}
    worst = max(float((h.float() - w).abs().max() / w.abs().max().clamp_min(1e-12))
                for h, w in zip(half.values(), weights.values()))
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(half, {**{k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, "bundled_from": source.name,
                       "storage_dtype": "float16"}, target)
    return f"{target}: {target.stat().st_size / 1e6:.1f} MB, largest relative weight change {worst:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a model file written by svnr train (best.safetensors)")
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    print(bundle(args.source, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
