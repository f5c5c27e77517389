"""What the svnr subcommands share: the device, a progress bar, the model to load."""
from __future__ import annotations

import argparse

import torch

from ..denoise import default_model


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("svnr: --device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


class ProgressBar:
    def __init__(self, description: str, enabled: bool = True):
        self.description, self.enabled, self.bar = description, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=self.description, unit="eval")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_model_for(args: argparse.Namespace, device: torch.device):
    from ..checkpoint import CheckpointError, load_model

    if args.model is None:
        return default_model(device)
    try:
        return load_model(args.model, device)
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"svnr {args.command}: --model: {err}") from None
