"""Training data: random crops of a folder of photos, as whole batches that depend only on the step.

The batch of step `s` on rank `r` is a pure function of `(seed, s, r)`: which images, where the crops
lie and which of the 8 flips/rotations each gets. A resumed run therefore sees exactly the batches an
uninterrupted run would have seen, whatever the number of data workers, and every DDP rank sees its own.
Images are decoded once per worker process and kept in a byte-limited cache.
"""
from __future__ import annotations

import signal
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from . import imageio

DATA_STREAM = 0x5EED_DA7A   # keeps the data's random stream apart from the training step's


def find_images(root) -> list[Path]:
    """Every PNG/JPEG/TIFF file below `root` (hidden files and folders skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in imageio.SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(imageio.SUFFIXES)}) in {root}")
    return files


def split_folder(root) -> tuple[Path, Path | None]:
    """(training folder, held-out folder or None): `root/train` + `root/heldout` when both exist, else root."""
    root = Path(root)
    train, heldout = root / "train", root / "heldout"
    if train.is_dir() and heldout.is_dir():
        return train, heldout
    return root, None


def load_rgb(path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: gray is repeated to three channels, alpha is dropped."""
    pixels = imageio.read_image(path).pixels
    return pixels.expand(3, -1, -1).contiguous() if pixels.shape[0] == 1 else pixels


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the square (k in [0, 8)) applied to the last two dimensions."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


class RandomCropBatches(torch.utils.data.Dataset):
    """`dataset[step]` is the (batch_size, 3, crop, crop) float32 batch of that step on this rank.

    Images are drawn uniformly, crops uniformly inside them, then one of the 8 flips/rotations.
    Images smaller than the crop are left out (with a warning).
    """

    def __init__(self, files, batch_size: int, crop: int, seed: int = 0, rank: int = 0,
                 cache_bytes: int = 1 << 30):
        if batch_size < 1 or crop < 1:
            raise ValueError(f"batch_size and crop must be positive, got {batch_size} and {crop}")
        self.batch_size, self.crop, self.seed, self.rank, self.cache_bytes = batch_size, crop, seed, rank, cache_bytes
        self.files, small = [], []
        for path in files:
            width, height = imageio.read_size(path)
            (self.files if min(width, height) >= crop else small).append(Path(path))
        if small:
            warnings.warn(f"{len(small)} image(s) smaller than the {crop}x{crop} crop are left out, e.g. {small[0]}",
                          stacklevel=2)
        if not self.files:
            raise ValueError(f"no image is at least {crop}x{crop} pixels; lower --crop or add larger photos")
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return 2**62    # indexed by step: as many batches as a run asks for

    def image(self, index: int) -> torch.Tensor:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        image = load_rgb(self.files[index])
        self._cache[index] = image
        self._cached_bytes += image.numel() * image.element_size()
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.numel() * evicted.element_size()
        return image

    def __getitem__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, int(step), self.rank, DATA_STREAM])
        batch = torch.empty(self.batch_size, 3, self.crop, self.crop)
        for i, index in enumerate(rng.integers(len(self.files), size=self.batch_size)):
            image = self.image(int(index))
            top = int(rng.integers(image.shape[1] - self.crop + 1))
            left = int(rng.integers(image.shape[2] - self.crop + 1))
            crop = image[:, top:top + self.crop, left:left + self.crop]
            batch[i] = dihedral(crop, int(rng.integers(8)))
        return batch


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A SIGTERM or SIGINT sent to the whole process group (a scheduler, a terminal) would kill the workers
    and crash the trainer before it could write its checkpoint; the trainer stops them itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_loader(dataset: RandomCropBatches, start: int, stop: int, workers: int = 0, pin_memory: bool = False):
    """The batches of steps [start, stop) in order, decoded by `workers` processes (0: in this one)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, generator=torch.Generator(),   # leaves the global RNG alone
        worker_init_fn=_leave_stop_signals_to_the_trainer if workers else None)


def heldout_crops(files, size: int = 256) -> list[torch.Tensor]:
    """Centre crops (3, s, s) of every held-out image, s = min(size, its shorter side) rounded down to 8."""
    crops = []
    for path in files:
        image = load_rgb(path)
        _, H, W = image.shape
        s = min(size, H, W) // 8 * 8
        if s == 0:
            continue
        top, left = (H - s) // 2, (W - s) // 2
        crops.append(image[:, top:top + s, left:left + s].contiguous())
    if not crops:
        raise ValueError("no held-out image is at least 8x8 pixels")
    return crops
