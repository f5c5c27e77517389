"""What the low-frequency error of the outputs kept by `lowpass_sources.py --save` is made of, and what
taking the output's low band from the observation instead would do, without running the network again.

    python benchmarks/lowpass_correction.py benchmarks/results/defaults/lowpass/outputs.npz

Decomposition of the low-passed error e = G_8 (output - clean) of every output, by least squares on
    e = a * G_8 (y - clean) + b * (G_8 clean - 0.5) + r:
a: how much of the noise's own low frequencies the output keeps (1: all of it, as the noisy photo does;
> 1: the network amplifies them into blotches), b: a pull toward 0.5 (negative: shrinkage toward the EDM
preconditioning's centre), r: the rest (RMS), error the network adds that neither explains.

Correction: svnr_fast.app.denoise.observed_low_band for Gaussian widths s (y the observation, unclipped as
svnr eval makes it: output + G_s (y - output)), the output's band below ~1/s replaced by the observation's,
whose noise there is tiny; and at the default s with y clipped to [0, 1], as a photo file holds it (the same
outputs: the network's own response to clipped input is not part of this).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from svnr_fast import PoissonGaussian  # noqa: E402
from svnr_fast.app import metrics  # noqa: E402
from svnr_fast.app.denoise import DEFAULT_LOW_BAND, observed_low_band  # noqa: E402

WIDTHS = (4, 5, 6, 8, 16, 32)
BANDS = (1, 2, 4, 8, 16, 32)


def band_rms(error: np.ndarray) -> list[float]:
    """RMS of the error per octave band: x - G_1 x, G_1 x - G_2 x, ..., G_16 x - G_32 x, then G_32 x."""
    blurred = [error] + [metrics.gaussian_blur(error, s) for s in BANDS]
    return [float(np.sqrt(np.mean((blurred[k] - blurred[k + 1]) ** 2))) for k in range(len(BANDS))] + \
        [float(np.sqrt(np.mean(blurred[-1] ** 2)))]


def decompose(output: np.ndarray, clean: np.ndarray, noisy: np.ndarray) -> tuple[float, float, float]:
    blur = lambda x: metrics.gaussian_blur(x, metrics.LOW_PASS_SIGMA).ravel()   # noqa: E731
    e = blur(np.clip(output, 0, 1) - clean)
    design = np.stack([blur(noisy - clean), blur(clean) - 0.5], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, e, rcond=None)
    return float(a), float(b), float(np.sqrt(np.mean((e - design @ np.array([a, b])) ** 2)))


def corrected(output: np.ndarray, noisy: np.ndarray, level: str, width: float) -> np.ndarray:
    def tensor(x):
        return torch.from_numpy(x).permute(2, 0, 1)[None]
    noise = PoissonGaussian(*map(float, level.split(",")))
    return observed_low_band(tensor(np.clip(output, 0, 1)), tensor(noisy), noise, width)[0].permute(1, 2, 0).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--variants", nargs="+", default=["svnr-1", "svnr-4"])
    args = parser.parse_args()
    data = np.load(args.outputs)
    keys = [k.split("|") for k in data.files]
    cases = sorted({(image, level) for image, level, _ in keys})
    rows, bands = collections.defaultdict(list), collections.defaultdict(list)
    for image, level in cases:
        clean, noisy = data[f"{image}|{level}|clean"].astype(np.float64), data[f"{image}|{level}|noisy-input"]
        noisy = noisy.astype(np.float64)
        rows[(level, "noisy (unclipped)")].append(
            (metrics.image_metrics(noisy, clean)["psnr"], metrics.low_pass_error(noisy, clean), 1.0, 0.0, 0.0))
        bands[(level, "noise (unclipped)")].append(band_rms(noisy - clean))
        for variant in args.variants:
            key = f"{image}|{level}|{variant}"
            if key not in data.files:
                continue
            output = data[key].astype(np.float64)
            bands[(level, variant)].append(band_rms(np.clip(output, 0, 1) - clean))
            m = metrics.image_metrics(output, clean)
            rows[(level, variant)].append((m["psnr"], m["lowpass_error"], *decompose(output, clean, noisy)))
            for width, observation, label in [*((w, noisy, f"low band G_{w}") for w in WIDTHS),
                                              (DEFAULT_LOW_BAND, np.clip(noisy, 0, 1),
                                               f"low band G_{DEFAULT_LOW_BAND:g}, clipped y")]:
                fixed = corrected(output, observation, level, width)
                if label.endswith("clipped y"):     # the naive form beside it: clipped y against the output itself
                    naive = output + metrics.gaussian_blur(observation - np.clip(output, 0, 1), width)
                    m = metrics.image_metrics(naive, clean)
                    rows[(level, f"{variant} + naive G_{width:g} * (clip(y) - out)")].append(
                        (m["psnr"], m["lowpass_error"], *decompose(naive, clean, noisy)))
                m = metrics.image_metrics(fixed, clean)
                rows[(level, f"{variant} + {label}")].append((m["psnr"], m["lowpass_error"], *decompose(fixed, clean,
                                                                                                          noisy)))
    print("| level | output | PSNR | low-pass error | a (noise kept) | b (pull to 0.5) | rest |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (level, name), values in rows.items():
        mean = np.mean(values, axis=0)
        print(f"| {level} | {name} | {mean[0]:.2f} | {mean[1]:.4f} | {mean[2]:.2f} | {mean[3]:+.3f} | {mean[4]:.4f} |")
    print("\nRMS of the error per octave band (difference of Gaussians; the last column: G_32 and below):\n")
    print("| level | error of | " + " | ".join(f"G_{a}-G_{b}" for a, b in zip((0, *BANDS), BANDS)) + " | G_32 |")
    print("|---|---|" + "---:|" * (len(BANDS) + 1))
    for (level, name), values in bands.items():
        print(f"| {level} | {name} | " + " | ".join(f"{v:.4f}" for v in np.mean(values, axis=0)) + " |")
    print(f"\n{len(cases)} (photo, level) cases from {args.outputs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
