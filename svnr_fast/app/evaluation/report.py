"""What `svnr eval` writes: the summary rows, CSV and markdown tables, picture grids and the quality-vs-steps
plot (SVG written by hand: matplotlib is not a dependency)."""
from __future__ import annotations

import csv
import math
import platform
from pathlib import Path

import numpy as np
import torch

from ..metrics import HIGH_PASS_SIGMA
from .methods import Method, level_label
from .runner import Evaluation

GRID_MIN_WIDTH = 96     # pixels per panel in the picture grid
SUMMARY_COLUMNS = ("method", "family", "level", "sigma_r", "sigma_s", "images", "psnr", "ssim", "hf_ratio", "nfe",
                   "seconds")
PER_IMAGE_COLUMNS = ("image", "method", "family", "level", "sigma_r", "sigma_s", "sigma_r_used", "sigma_s_used",
                     "psnr", "ssim", "hf_ratio", "nfe", "seconds")


def summarise(evaluation: Evaluation) -> list[dict]:
    """Mean over photos per (level, method), levels in the order given, methods in the order asked."""
    summary = []
    for level in evaluation.levels:
        for method in evaluation.methods:
            rows = [r for r in evaluation.rows if r["method"] == method.name and r["level"] == level_label(level)]
            if not rows:
                continue
            mean = {key: float(np.mean([r[key] for r in rows]))
                    for key in ("psnr", "ssim", "hf_ratio", "nfe", "seconds")}
            summary.append({"method": method.name, "family": method.family, "level": level_label(level),
                            "sigma_r": level[0], "sigma_s": level[1], "images": len(rows), **mean})
    return summary


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _nfe_text(nfe: float) -> str:
    return str(int(nfe)) if float(nfe).is_integer() else f"{nfe:.1f}"


def markdown_table(summary: list[dict]) -> str:
    lines = ["| method | level | PSNR | SSIM | HF ratio | NFE | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in summary:
        lines.append(f"| {row['method']} | {row['level']} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
                     f"{row['hf_ratio']:.3f} | {_nfe_text(row['nfe'])} | {row['seconds']:.3f} |")
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def pick_grid_columns(summary: list[dict], level: str, ran: list[Method]) -> list[str]:
    """noisy | SVNR | baseline | ablation | best classical (by mean PSNR at this level), those that ran."""
    names = {m.name for m in ran}
    columns = ["noisy"] if "noisy" in names else []
    for family in ("svnr", "baseline", "ablation"):
        members = [m for m in ran if m.family == family]
        if not members:
            continue
        default = [m for m in members if m.steps is None]   # the paper's ceil(max tau*) steps
        columns.append((default or sorted(members, key=lambda m: m.steps))[-1].name)
    classical = [r for r in summary if r["level"] == level and r["family"] == "classical"]
    if classical:
        columns.append(max(classical, key=lambda r: r["psnr"])["method"])
    return columns


def write_grid(path: Path, panels: list[tuple[str, str, torch.Tensor]]) -> None:
    """Panels (title, subtitle, (3, H, W) in [0, 1]) side by side under two-line labels, as an 8-bit PNG.

    Panels narrower than GRID_MIN_WIDTH are enlarged (nearest neighbour, an integer factor) so the labels fit.
    """
    from PIL import Image, ImageDraw
    strip, gap = 28, 4
    scale = max(1, math.ceil(GRID_MIN_WIDTH / min(p.shape[2] for _, _, p in panels)))
    pictures = []
    for _, _, pixels in panels:
        array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(array)
        pictures.append(picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST))
    height = max(p.height for p in pictures)
    canvas = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(panels) - 1), height + strip), "white")
    left = 0
    for (title, subtitle, _), picture in zip(panels, pictures):
        label = Image.new("RGB", (picture.width, strip), "white")   # drawn apart, so long labels are cut at the panel
        draw = ImageDraw.Draw(label)
        draw.text((2, 1), title, fill="black")
        draw.text((2, 14), subtitle, fill="#444444")
        canvas.paste(label, (left, 0))
        canvas.paste(picture, (left, strip))
        left += picture.width + gap
    canvas.save(path)


SERIES_COLOURS = {"svnr": "#1f77b4", "ablation": "#ff7f0e", "baseline": "#2ca02c", "x0hat": "#9467bd"}
LINE_COLOURS = {"noisy": "#000000", "bm3d": "#8c564b", "nlm": "#7f7f7f", "wavelet": "#bcbd22"}


def _nice_step(span: float) -> float:
    raw = span / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def quality_vs_steps_svg(summary: list[dict], levels: list[tuple[float, float]]) -> str:
    """PSNR against network evaluations (log axis), one panel per level: the network methods as lines
    (svnr, ablation, baseline over their step counts; x0hat a point), noisy and classical as dashed
    horizontal lines."""
    width, height, left, right, top, bottom = 380, 280, 52, 78, 30, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    legend, x = [], 10
    for label, colour in [*SERIES_COLOURS.items(), ("noisy / classical (dashed, no network)", "#555")]:
        legend.append(f'<rect x="{x}" y="{height + 6}" width="10" height="10" fill="{colour}"/>')
        legend.append(f'<text x="{x + 14}" y="{height + 15}">{label}</text>')
        x += 24 + 7 * len(label)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(width * len(levels), x)}" height="{height + 24}" '
           f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    max_nfe = max([r["nfe"] for r in summary] + [10])
    decades = max(1, math.ceil(math.log10(max_nfe)))
    for panel, level in enumerate(levels):
        rows = [r for r in summary if r["level"] == level_label(level)]
        if not rows:
            continue
        ox = panel * width
        low = min(r["psnr"] for r in rows)
        high = max(r["psnr"] for r in rows)
        step = _nice_step(max(high - low, 1.0))
        low, high = math.floor(low / step) * step, math.ceil(high / step) * step

        def x_of(nfe: float) -> float:
            return ox + left + plot_w * math.log10(max(nfe, 1)) / decades

        def y_of(psnr: float) -> float:
            return top + plot_h * (high - psnr) / (high - low)

        out.append(f'<text x="{ox + left + plot_w / 2}" y="18" text-anchor="middle" font-weight="bold">'
                   f'sigma_r={level[0]:g}, sigma_s={level[1]:g}</text>')
        out.append(f'<rect x="{ox + left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
        for k in range(decades + 1):
            x = x_of(10**k)
            out.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{top + plot_h}" stroke="#ddd"/>')
            out.append(f'<text x="{x}" y="{top + plot_h + 14}" text-anchor="middle">{10**k}</text>')
        value = low
        while value <= high + 1e-9:
            y = y_of(value)
            out.append(f'<line x1="{ox + left}" y1="{y}" x2="{ox + left + plot_w}" y2="{y}" stroke="#eee"/>')
            out.append(f'<text x="{ox + left - 4}" y="{y + 4}" text-anchor="end">{value:g}</text>')
            value += step
        out.append(f'<text x="{ox + left + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle">'
                   'network evaluations per photo (NFE)</text>')
        out.append(f'<text transform="translate({ox + 14},{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                   'PSNR (dB)</text>')
        for row in rows:
            if row["nfe"] == 0:     # noisy and classical: no network, a reference line
                y = y_of(row["psnr"])
                colour = LINE_COLOURS.get(row["method"], "#999")
                out.append(f'<line x1="{ox + left}" y1="{y}" x2="{ox + left + plot_w}" y2="{y}" stroke="{colour}" '
                           'stroke-dasharray="5,3"/>')
                out.append(f'<text x="{ox + left + plot_w + 4}" y="{y + 4}" fill="{colour}">{row["method"]}</text>')
        for family, colour in SERIES_COLOURS.items():
            points = sorted((r["nfe"], r["psnr"], r["method"]) for r in rows if r["family"] == family)
            if not points:
                continue
            if len(points) > 1:
                path = " ".join(f"{x_of(n):.1f},{y_of(p):.1f}" for n, p, _ in points)
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            for n, p, name in points:
                out.append(f'<circle cx="{x_of(n):.1f}" cy="{y_of(p):.1f}" r="3" fill="{colour}">'
                           f'<title>{name}: {p:.2f} dB, {_nfe_text(n)} NFE</title></circle>')
    out += legend
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_outputs(out: Path, evaluation: Evaluation, summary: list[dict], header: list[str],
                  skipped: list[tuple[str, str]]) -> list[Path]:
    """results.csv, per_image.csv, results.md, grid-<level>.png and quality_vs_steps.svg; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", summary, SUMMARY_COLUMNS)
    write_csv(out / "per_image.csv", evaluation.rows, PER_IMAGE_COLUMNS)
    files = [out / "results.csv", out / "per_image.csv"]
    first = evaluation.images[0]
    for index, level in enumerate(evaluation.levels):
        label = level_label(level)
        panels = []
        for name in pick_grid_columns(summary, label, evaluation.methods):
            row = next(r for r in evaluation.rows if r["image"] == first.name and r["level"] == label
                       and r["method"] == name)
            panels.append((name, f"{row['psnr']:.2f} dB", evaluation.first_outputs[(index, name)]))
        panels.append(("clean", first.name, first.clean))
        grid = out / f"grid-{label.replace(',', '-')}.png"
        write_grid(grid, panels)
        files.append(grid)
    (out / "quality_vs_steps.svg").write_text(quality_vs_steps_svg(summary, evaluation.levels))
    files.append(out / "quality_vs_steps.svg")
    lines = ["# svnr eval", "", *[f"- {line}" for line in header], "", markdown_table(summary), ""]
    if skipped:
        lines += ["Skipped:", "", *[f"- `{name}`: {reason}" for name, reason in skipped], ""]
    lines += ["PSNR and SSIM: scikit-image, data_range=1, outputs clipped to [0, 1]. HF ratio: energy of "
              f"x - G_{HIGH_PASS_SIGMA:g}*x (Gaussian high-pass, sigma {HIGH_PASS_SIGMA:g} px) of the output over that "
              "of the clean photo (~1 keeps texture, < 1 smooths it). NFE: network evaluations per photo. "
              "seconds: wall time per photo (batched network calls shared out over the batch).", "",
              f"Figures: {', '.join(f'[{p.name}]({p.name})' for p in files[2:])}; every photo and level in "
              "per_image.csv.", ""]
    (out / "results.md").write_text("\n".join(lines))
    files.insert(2, out / "results.md")
    return files
