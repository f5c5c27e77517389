"""The drop-in case (issue 13): another SVNR codebase's reverse loop, eager as such a codebase writes it, vs the
same loop through svnr_fast.

The loop: 1000 integer-index ancestral steps (delta = 1, ending on x0_hat), one time map per channel, data
in [-1, 1] with the noise model in [0, 1], a variance table of T entries without the zero (svnr_fast's
conventions; tests/test_conventions.py checks that both loops compute the same function). The network is
replaced by a fixed eps_hat, so only what svnr_fast replaces is timed: the schedule lookups, the update and
the noise. `eager`: the codebase's loop (index lookups, the posterior in its `coef * x + coef * x0_hat +
coef * z` form, torch.randn_like, a `while any(k >= 0)` host check per step). `svnr_fast`:
`conventions.sample_index_time` on the table in data units (noise drawn by the op from seed/offset).

`pytest benchmarks/bench_dropin.py --benchmark-only`; the ratio of the two medians is the speedup.
"""
import pytest
import torch

from common import Case, dtype_name
from svnr_fast import Schedule, conventions

STEPS = 1000
CPU_SHAPE = (16, 3, 32, 32)          # CIFAR-sized batch, the other codebase's own data
GPU_SHAPES = [(16, 3, 32, 32), (16, 3, 256, 256)]


def problem(shape, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    schedule = Schedule()
    y_prime = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    eps_hat = (torch.randn(shape, generator=gen) * 0.1).to(device)
    index_star = torch.randint(STEPS - 100, STEPS, shape, generator=gen).to(device)   # one index per channel
    index_star.view(-1)[0] = STEPS - 1                   # so that the loop takes STEPS steps
    gamma_table = schedule.table[1:].to(device)          # what the codebase stores: T entries, index k = 0..T-1
    tau_star = schedule.time_from_index(index_star)      # svnr time: index + 1
    table = conventions.table_in_data_units(schedule.table.to(device), (-1, 1))
    return y_prime, eps_hat, index_star, gamma_table, tau_star, table


def eager_loop(y_prime, eps_hat, index_star, gamma_table):
    """The codebase's loop, as it is written: [0, 1] inside, index time per pixel and channel."""
    x = (y_prime + 1) / 2
    k = index_star.clone()
    while bool((k >= 0).any()):
        at = k.clamp_min(0)
        g_t = gamma_table[at]
        g_prev = torch.where(k >= 1, gamma_table[(at - 1).clamp_min(0)], 0.0)
        x0_hat = x - g_t.sqrt() * eps_hat
        ratio = g_prev / g_t
        stepped = ratio * x + (1 - ratio) * x0_hat + (g_prev * (1 - ratio)).sqrt() * torch.randn_like(x)
        x = torch.where(k >= 0, stepped, x)
        k = k - 1
    return 2 * x - 1


def svnr_fast_loop(y_prime, eps_hat, tau_star, table):
    return conventions.sample_index_time(lambda condition, x, tau: eps_hat, y_prime, y_prime, tau_star, table)


def gpu_cases(device: str):
    """One row per shape for benchmarks/gpu_suite.py: the whole 1000-step loop."""
    for shape in GPU_SHAPES if device.startswith("cuda") else [(1, 3, 8, 8)]:
        y_prime, eps_hat, index_star, gamma_table, tau_star, table = problem(shape, device)
        n = y_prime.numel()
        # per step: x and eps_hat read, x written (float32), the per-channel time map read and written
        bytes_moved = STEPS * 5 * n * 4
        yield Case(op=f"dropin_reverse_loop_{STEPS}", shape="x".join(map(str, shape)), dtype=dtype_name(y_prime.dtype),
                   bytes_moved=bytes_moved, fused=lambda: svnr_fast_loop(y_prime, eps_hat, tau_star, table),
                   eager=lambda: eager_loop(y_prime, eps_hat, index_star, gamma_table), compiled=None)


@pytest.mark.parametrize("impl", ["eager", "svnr_fast"])
def test_dropin_reverse_loop(benchmark, impl):
    y_prime, eps_hat, index_star, gamma_table, tau_star, table = problem(CPU_SHAPE, "cpu")
    benchmark.group = f"dropin reverse loop, {STEPS} index steps, per-channel, {'x'.join(map(str, CPU_SHAPE))} cpu"
    if impl == "eager":
        fn = lambda: eager_loop(y_prime, eps_hat, index_star, gamma_table)  # noqa: E731
    else:
        fn = lambda: svnr_fast_loop(y_prime, eps_hat, tau_star, table)  # noqa: E731
    out = benchmark.pedantic(fn, rounds=3, iterations=1)
    assert out.shape == CPU_SHAPE and bool(torch.isfinite(out).all())
