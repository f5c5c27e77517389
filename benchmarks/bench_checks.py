"""The public ops' value checks (NaN/inf scans, bounds, the table's order) against the raw op they guard.

`checked` is `svnr_fast.ops.<op>` (checks, then the op); `raw` is the `torch.ops.svnr.<op>` call it makes
on the same arguments. Both run in one session on the backend this machine dispatches to, so the ratio of
their medians is the cost of the checks (target: at most 1.1).

    pytest benchmarks/bench_checks.py --benchmark-only --benchmark-group-by=group
"""
import pytest
import torch

from svnr_fast import Schedule, ops
from svnr_fast.ops._checks import compute_dtype

IMPLS = ("checked", "raw")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def reverse_step_calls(shape=(4, 3, 256, 256), device=None):
    device = device or _device()
    gen = torch.Generator(device=device).manual_seed(0)
    B, C, H, W = shape
    x = torch.rand(shape, generator=gen, device=device)
    eps_hat = torch.randn(shape, generator=gen, device=device)
    tau = torch.rand((B, 1, H, W), generator=gen, device=device) * 100
    delta = torch.full((B,), 2.0, device=device)
    table = Schedule().table.to(device)
    return {"checked": lambda: ops.reverse_step(x, eps_hat, tau, delta, table, seed=1),
            "raw": lambda: torch.ops.svnr.reverse_step(x, eps_hat, tau, delta, table, 1.0, None, None, None, 1, 0,
                                                       False)}


def training_sample_calls(shape=(4, 3, 256, 256), device=None):
    device = device or _device()
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(shape, generator=gen, device=device)
    per_image = torch.full((shape[0],), 0.1, device=device)
    table = Schedule().table.to(device)
    return {"checked": lambda: ops.training_sample(x0, per_image, per_image, per_image, table, seed=1),
            "raw": lambda: torch.ops.svnr.training_sample(x0, per_image, per_image, per_image,
                                                          table.to(compute_dtype(x0.dtype)), True, None, None, 1, 0,
                                                          False, False, 0.0)}


def groupnorm_film_calls(shape=(8, 64, 128, 128), device=None, groups=32, K=257):
    device = device or _device()
    gen = torch.Generator(device=device).manual_seed(0)
    B, C, H, W = shape
    h = torch.randn(shape, generator=gen, device=device)
    u = torch.rand((B, 1, H, W), generator=gen, device=device) * (K - 1)
    table = torch.randn((K, 2 * C), generator=gen, device=device) * 0.1
    weight, bias = torch.ones(C, device=device), torch.zeros(C, device=device)
    return {"checked": lambda: ops.groupnorm_film(h, u, table, weight, bias, groups),
            "raw": lambda: torch.ops.svnr.groupnorm_film(h, u, table, weight, bias, groups, 1e-5, "silu")}


CALLS = {"reverse_step 4x3x256x256": reverse_step_calls, "training_sample 4x3x256x256": training_sample_calls,
         "groupnorm_film 8x64x128x128": groupnorm_film_calls}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CALLS))
def test_checks(benchmark, case, impl):
    call = CALLS[case]()[impl]
    benchmark.group = f"checks: {case}"
    call()
    if _device() == "cuda":
        benchmark.pedantic(lambda: (call(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(call, rounds=7, warmup_rounds=1)
