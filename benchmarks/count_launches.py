"""How many kernels a training step and a sampling step launch on CUDA, eager vs replayed from a CUDA graph,
counted on any machine (a CPU is enough).

Method: the step runs once on CPU tensors under torch.profiler; every operator call that would launch a
kernel on CUDA is counted: an aten operator that is not pure metadata (views, allocations, dropout in eval
mode: NO_LAUNCH) and none of whose callees counts (an operator that calls counted ones launches nothing of its
own), plus the svnr ops, whose CUDA kernels launch a known number of kernels each (SVNR_LAUNCHES; their CPU
implementations' inner calls are not counted). Views, casts that turn out to be no-ops and fused library
calls make this an estimate of the CUDA count, not a trace of it. Captured: the eager part of a
step (the sample and its copies into the graph's inputs, the schedule's fills) plus one graph launch.

    python benchmarks/count_launches.py [--preset small] [--batch 4] [--crop 64] [--steps 4] [--json]

The counts do not depend on the batch size or the crop (only on the network and the step's structure).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from svnr_fast import Schedule
from svnr_fast.app import training
from svnr_fast.app.models import SVNRUNet, preset
from svnr_fast.sampling import _loop, plan_steps

# aten operators that launch no kernel on CUDA: metadata, views and allocations
NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::permute", "aten::transpose", "aten::t",
    "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::detach_",
    "aten::alias", "aten::lift_fresh", "aten::resize_", "aten::unbind", "aten::split", "aten::split_with_sizes",
    "aten::chunk", "aten::narrow", "aten::set_", "aten::result_type", "aten::is_nonzero", "aten::_local_scalar_dense",
    "aten::view_as", "aten::expand_as", "aten::flatten", "aten::unflatten", "aten::contiguous", "aten::to",
    "aten::_to_copy", "aten::is_same_size", "aten::requires_grad_", "aten::new_empty", "aten::new_empty_strided",
    "aten::broadcast_tensors", "aten::movedim", "aten::numpy_T", "aten::type_as", "aten::as_strided_",
    "aten::resolve_conj", "aten::resolve_neg", "aten::promote_types", "aten::scalar_tensor", "aten::dropout",
    "aten::feature_dropout", "aten::item", "aten::size", "aten::stride", "aten::dim", "aten::is_contiguous",
}
# kernels per call of each svnr op on CUDA (kernels/*.py, csrc/groupnorm_film_cuda.cu); training_sample: one
# ordered launch where its programs fit one per SM, else a zero fill and two launches per chunk of images
SVNR_LAUNCHES = {"svnr::gamma": 1, "svnr::time_from_variance": 1, "svnr::time_map": 1, "svnr::training_sample": 1,
                 "svnr::reverse_step": 1, "svnr::groupnorm_film": 1, "svnr::groupnorm_film_backward": 3,
                 "svnr::bridge_sample": 1}


def count(run) -> int:
    """Kernels `run()` would launch on CUDA (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()

    def launches(event) -> int:
        if event.name in SVNR_LAUNCHES:
            return SVNR_LAUNCHES[event.name]
        below = sum(launches(child) for child in event.cpu_children)
        if below or not event.name.startswith("aten::") or event.name in NO_LAUNCH:
            return below
        return 1

    return sum(launches(event) for event in prof.events() if event.cpu_parent is None)


def training_counts(preset_name: str, batch: int, crop: int) -> dict:
    config = training.TrainConfig(preset=preset_name, batch_size=batch, crop=crop, steps=100, warmup_steps=0,
                                  time_map="observed")
    state = training.new_state(config, "cpu")
    network = training.NetworkOutput(state.model)
    x0 = torch.rand(batch, 3, crop, crop)
    training.train_step(state, network, x0, config)

    def eager():
        training.train_step(state, network, x0, config)

    def eager_part():       # what StepGraph runs outside its graph: the sample, the schedule, the input copies
        sample = training.make_sample(state.model, x0, config, state.step, 0)
        state.set_schedule(config)
        for static, value in zip([torch.empty_like(t) for t in (x0, *sample)], (x0, *sample)):
            static.copy_(value)

    return {"eager": count(eager), "cuda_graph": count(eager_part) + 1}


def sampling_counts(preset_name: str, batch: int, crop: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = SVNRUNet(preset(preset_name)).eval()
    y = torch.rand(batch, 3, crop, crop)
    tau = torch.rand(batch, 1, crop, crop) * 30
    plan = plan_steps(tau, steps)
    table = Schedule().table

    def loop():
        with torch.inference_mode():
            _loop(model, y, y, tau, table, plan, 0.0, 0.0, 1.0, 0)

    per_step = count(loop) / steps
    # SamplerGraphs captures the whole loop: one launch per photo (or tile group), whatever the step count
    return {"eager_per_step": per_step, "cuda_graph_per_step": 1 / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [{"step": "training", "preset": args.preset, **training_counts(args.preset, args.batch, args.crop)},
            {"step": "sampling", "preset": args.preset, **sampling_counts(args.preset, args.batch, args.crop,
                                                                          args.steps)}]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        print(" ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in row.items()))


if __name__ == "__main__":
    main()
