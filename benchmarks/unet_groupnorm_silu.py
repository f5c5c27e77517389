"""The bundled UNet on the CPU with its GroupNorm + SiLU pairs fused (svnr::groupnorm_silu, the model as it is)
and unfused (each GroupNormSiLU swapped for nn.GroupNorm then nn.SiLU on the same parameters: the model as it
was), in one process:
  - the network forward at Bx3xSxS (denoise's default tiles: --batch 4 --size 64), best of --repeats, the two models alternating (a quiet spell helps both):
    wall time, and the process's CPU time, which other jobs on a shared machine disturb less (with --threads 1
    it is the forward's own compute time);
  - the GroupNorm + SiLU calls of that forward alone, each input shape timed fused and unfused (CPU time, best of
    --repeats), summed over the forward's calls;
  - the largest difference of their network outputs and of a whole `denoise` of a noisy SxS photo (defaults).

    python benchmarks/unet_groupnorm_silu.py [--batch 1] [--size 256] [--repeats 10] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from svnr_fast import denoise
from svnr_fast.app.denoise import default_model
from svnr_fast.nn import GroupNormSiLU
from svnr_fast.ops import backends


def unfused(model: nn.Module) -> nn.Module:
    """A copy of `model` whose GroupNormSiLU modules are nn.GroupNorm followed by nn.SiLU."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupNormSiLU):
                norm = nn.GroupNorm(child.groups, child.channels, child.eps)
                norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, nn.Sequential(norm, nn.SiLU()))
    return model


def seconds(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def groupnorm_silu_inputs(model: nn.Module, *inputs) -> list[tuple[torch.Size, int]]:
    """(shape of h, groups) of every GroupNormSiLU call of one model.network(*inputs)."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((args[0].shape, m.groups)))
             for m in model.modules() if isinstance(m, GroupNormSiLU)]
    model.network(*inputs)
    for hook in hooks:
        hook.remove()
    return calls


def op_cpu_ms(shape: torch.Size, groups: int, repeats: int) -> tuple[float, float]:
    """Best CPU ms of the fused op and of F.silu(F.group_norm) on one input."""
    h, weight, bias = torch.randn(shape), torch.randn(shape[1]), torch.randn(shape[1])
    fused = functools.partial(torch.ops.svnr.groupnorm_silu, h, weight, bias, groups, 1e-5)
    def unfused_call():
        return F.silu(F.group_norm(h, groups, weight, bias, 1e-5))
    return tuple(min(seconds(fn)[1] for _ in range(repeats)) * 1e3 for fn in (fused, unfused_call))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    choice = backends.choose("groupnorm_silu", "cpu")
    fused_model = default_model("cpu")
    models = {"fused": fused_model, "unfused": unfused(fused_model)}
    gen = torch.Generator().manual_seed(0)
    B, S = args.batch, args.size
    clean = torch.rand(B, 3, S, S, generator=gen)
    y = (clean + 0.1 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    x_t = torch.rand(B, 3, S, S, generator=gen)
    tau = torch.rand(B, 1, S, S, generator=gen) * 300

    with torch.inference_mode():
        outputs = {name: model.network(y, x_t, tau) for name, model in models.items()}
        best = {name: (float("inf"), float("inf")) for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                wall, cpu = seconds(functools.partial(model.network, y, x_t, tau))
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        photo = {name: denoise(y[0], (0.1, 0.0), model=model) for name, model in models.items()}
        op_ms = [op_cpu_ms(shape, groups, args.repeats)
                 for shape, groups in groupnorm_silu_inputs(fused_model, y, x_t, tau)]

    print(f"groupnorm_silu on cpu: {choice.backend} ({choice.reason}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for i, clock in enumerate(("wall", "CPU")):
        fused, unfused_ = best["fused"][i] * 1e3, best["unfused"][i] * 1e3
        print(f"UNet network forward {B}x3x{S}x{S}, best of {args.repeats}, {clock} time: fused {fused:.1f} ms, "
              f"unfused {unfused_:.1f} ms ({unfused_ / fused:.2f}x)")
    print(f"its {len(op_ms)} GroupNorm + SiLU calls alone, CPU time: fused {sum(f for f, _ in op_ms):.1f} ms, "
          f"unfused {sum(u for _, u in op_ms):.1f} ms")
    print(f"max |fused - unfused|: network output {(outputs['fused'] - outputs['unfused']).abs().max():.2e}, "
          f"denoised photo {(photo['fused'] - photo['unfused']).abs().max():.2e}")


if __name__ == "__main__":
    main()
