"""End-to-end denoising of one photo: noise estimate excluded, top-up + sampling included.

The `small` preset (the bundled model's architecture; the bundled weights when they exist, random
weights otherwise: the time does not depend on them), `STEPS` network evaluations, eta = 1. `fused`
uses whatever serves each op here (C++ or CUDA groupnorm_film, Triton reverse_step on a GPU); `eager`
forces the reference for every svnr op (SVNR_FAST_BACKEND=reference). On a GPU the network runs in
float32 and the denoiser is timed as a whole (`bytes_moved` is 0: GB/s does not apply), and
`fused-cudagraph` is the fused run with the sampling loop replayed from a CUDA graph captured on the first
(untimed) call and kept across calls (denoise(..., cuda_graph=SamplerGraphs())): the same steps without
the host's per-kernel work.
"""
import pytest
import torch
from common import Case, with_backend

from svnr_fast.app.checkpoint import load_model
from svnr_fast.app.denoise import BUNDLED_MODEL, denoise
from svnr_fast.app.models import SVNRUNet, preset
from svnr_fast.sampling import SamplerGraphs

STEPS = 25
NOISE = (0.05, 0.10)


def small_model(device: str):
    if BUNDLED_MODEL.is_file():
        return load_model(BUNDLED_MODEL, device)
    torch.manual_seed(0)
    return SVNRUNet(preset("small")).to(device).eval()


def photo(size: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, size // 16, size // 16, generator=generator)
    clean = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)[0]
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=generator)
    return noisy.to(device)


def denoiser(size: int, device: str, model, cuda_graph=False):
    y = photo(size, device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        denoise(y, NOISE, model=model, steps=STEPS, eta=1.0, cuda_graph=cuda_graph)
        synchronize()
    return run


def gpu_cases(device: str):
    model = small_model(device)
    on_gpu = device.startswith("cuda")
    for size in ((256, 512, 1024) if on_gpu else (32,)):
        run = denoiser(size, device, model)
        graphed = with_backend(None, denoiser(size, device, model, SamplerGraphs())) if on_gpu else None
        yield Case(op=f"denoise_small_{STEPS}steps", shape=f"1x3x{size}x{size}", dtype="float32", bytes_moved=0,
                   fused=with_backend(None, run), eager=with_backend("reference", run), compiled=None,
                   fused_cudagraph=graphed)


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_denoise_256(benchmark, impl):
    """DESIGN.md target: a 256x256 RGB photo in <= 5 s on a 2-core CPU (the paper's ~25 steps)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = with_backend("reference" if impl == "eager" else None, denoiser(256, device, small_model(device)))
    benchmark.group = f"denoise 1x3x256x256, small preset, {STEPS} steps"
    run()
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
