"""Assemble the default SVNR training set: real photographs any machine here can get, downscaled, as PNG.

Sources (only photographs: no renders, paintings, microscopy or medical images):
- scikit-image's bundled photos (`skimage.data`, no download);
- the photographs among the wallpapers of Debian's `plasma-workspace-wallpapers` package, fetched with
  `apt-get download plasma-workspace-wallpapers` and unpacked with `dpkg -x` (or `--deb FILE`).
Every image is reduced (Lanczos) so that its longest side is at most `--max-side` pixels (never
enlarged); downscaling the 2560-pixel wallpapers also averages away their sensor noise and JPEG
artefacts, so they serve as clean targets. Gray photos stay gray (training repeats them to RGB).

Held-out split (fixed; never used for training, used for the held-out PSNR during training and for the
bundled model's evaluation): the names in HELDOUT below. Output:
  OUT/train/*.png, OUT/heldout/*.png, OUT/manifest.json (sources, package version, split, sizes, sha256).
`svnr train --data OUT` uses train/ for training and heldout/ for the metric.

    python scripts/make_dataset.py --out data/photos
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data function -> output name; motorcycle is the left view of a stereo pair
SKIMAGE_PHOTOS = {"astronaut": "astronaut", "camera": "camera", "cat": "cat", "coffee": "coffee", "coins": "coins",
                  "rocket": "rocket", "moon": "moon", "grass": "grass", "gravel": "gravel", "brick": "brick",
                  "page": "page", "text": "text", "stereo_motorcycle": "motorcycle"}
WALLPAPER_PACKAGE = "plasma-workspace-wallpapers"
WALLPAPER_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                    "Kite", "OneStandsOut", "Path", "summer_1am")
# astronaut is also the photo of `svnr demo`; two RGB skimage photos and two wallpapers of different kinds
HELDOUT = ("skimage-astronaut", "skimage-coffee", "wallpaper-BytheWater", "wallpaper-FallenLeaf")


def reduce(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def skimage_photos():
    import skimage
    import skimage.data

    for function, name in SKIMAGE_PHOTOS.items():
        array = getattr(skimage.data, function)()
        if isinstance(array, tuple):
            array = array[0]
        yield f"skimage-{name}", Image.fromarray(np.asarray(array)), f"skimage.data.{function}() (scikit-image {skimage.__version__})"


def fetch_wallpapers(workdir: Path, deb: Path | None) -> tuple[Path, str]:
    """(the unpacked wallpapers folder, the .deb's file name)."""
    if deb is None:
        print(f"downloading {WALLPAPER_PACKAGE} with apt-get ...", file=sys.stderr)
        subprocess.run(["apt-get", "download", WALLPAPER_PACKAGE], cwd=workdir, check=True)
        debs = sorted(workdir.glob(f"{WALLPAPER_PACKAGE}_*.deb"))
        if not debs:
            raise SystemExit(f"apt-get download left no {WALLPAPER_PACKAGE}_*.deb in {workdir}")
        deb = debs[-1]
    unpacked = workdir / "unpacked"
    subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    return unpacked / "usr" / "share" / "wallpapers", deb.name


def wallpaper_photos(root: Path, deb_name: str):
    for name in WALLPAPER_PHOTOS:
        folder = root / name / "contents" / "images"
        candidates = sorted(folder.glob("*.*"), key=lambda p: Image.open(p).width * Image.open(p).height)
        if not candidates:
            raise SystemExit(f"{folder} holds no images: did the package layout change?")
        largest = candidates[-1]
        yield f"wallpaper-{name}", Image.open(largest).convert("RGB"), f"{deb_name}: {largest.relative_to(root)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/photos"))
    parser.add_argument("--max-side", type=int, default=1024, help="longest side of every image, in pixels")
    parser.add_argument("--deb", type=Path, default=None, help=f"a downloaded {WALLPAPER_PACKAGE}_*.deb")
    args = parser.parse_args(argv)
    for split in ("train", "heldout"):
        (args.out / split).mkdir(parents=True, exist_ok=True)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        root, deb_name = fetch_wallpapers(Path(tmp), args.deb)
        for name, image, source in [*skimage_photos(), *wallpaper_photos(root, deb_name)]:
            image = reduce(image, args.max_side)
            split = "heldout" if name in HELDOUT else "train"
            path = args.out / split / f"{name}.png"
            image.save(path, optimize=True)
            data = path.read_bytes()
            entries.append({"file": f"{split}/{path.name}", "source": source, "width": image.width,
                            "height": image.height, "mode": image.mode, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
            print(f"{split:8s} {path.name:32s} {image.width}x{image.height} {image.mode:3s} {len(data) / 1e6:.2f} MB",
                  file=sys.stderr)
    missing = set(HELDOUT) - {Path(e["file"]).stem for e in entries}
    if missing:
        raise SystemExit(f"held-out images missing from the sources: {sorted(missing)}")
    manifest = {"max_side": args.max_side, "heldout": list(HELDOUT), "images": entries,
                "train_files": sum(e["file"].startswith("train/") for e in entries),
                "heldout_files": sum(e["file"].startswith("heldout/") for e in entries),
                "total_bytes": sum(e["bytes"] for e in entries)}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(entries)} images ({manifest['train_files']} train, {manifest['heldout_files']} held out), "
          f"{manifest['total_bytes'] / 1e6:.1f} MB in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
