"""One SVNR training step (sample, forward, masked loss, backward, clipping, AdamW, EMA) of the same model
with the fused ops vs the eager reference ops (SVNR_FAST_BACKEND=reference), measured in one run.

The model is the `small` preset (the bundled CPU model), batch 16 of 64x64 crops, the default scheme
(correlated SVNR, EDM parametrisation). Both columns start from the same weights. The fused column
uses whatever serves each op here (C++ groupnorm_film on CPU; Triton/CUDA kernels on a GPU, with bf16
autocast); the eager column forces the reference for every svnr op. A compiled column would compile a
whole training step (minutes on a CPU), so the pytest benchmark has none; `bytes_moved` is 0 because a
training step has no meaningful minimum traffic (its GB/s columns do not apply).

On a GPU, `gpu_cases` adds `training_step_<preset>_cuda_graph` at batch 64 (`svnr train --cuda-graph`: fused =
the step after its sample replayed from a CUDA graph, eager = the eager reference step at that batch) and
`training_step_<preset>_compiled_network` (`svnr train --compile`): fused =
the fused ops inside torch.compile(network), eager = the plain eager reference step (the first case's
eager column). The sample, the loss, the optimiser and the EMA stay eager, as in `svnr train`. It has no
compiled column either: inside a compiled network the svnr ops stay opaque custom ops, so "compiled
reference" there would still run the reference groupnorm_film eagerly, not torch.compile(reference).
"""
import pytest
import torch
from common import Case, with_backend

from svnr_fast.app import training
from svnr_fast.ops import backends

BATCH, CROP = 16, 64
GRAPH_BATCH = 64


def training_step(device: str, preset: str = "small", batch: int = BATCH, crop: int = CROP,
                  compile_network: bool = False, cuda_graph: bool = False):
    """A callable that runs one training step on a fixed batch of smooth random images."""
    config = training.TrainConfig(preset=preset, batch_size=batch, crop=crop)
    state = training.new_state(config, device)
    network = training.NetworkOutput(state.model)
    if compile_network:
        network = torch.compile(network)
    graph = training.StepGraph() if cuda_graph else None
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, crop // 8, crop // 8, generator=generator)
    x0 = torch.nn.functional.interpolate(coarse, size=(crop, crop), mode="bicubic").clamp(0, 1).to(device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        training.train_step(state, network, x0, config, 0, graph)
        synchronize()
    return step


def fused_available(device_type: str) -> str | None:
    """None when the fused column really runs fused kernels here, else why not."""
    choice = backends.choose("groupnorm_film", device_type)
    if choice.backend == "reference":
        return f"groupnorm_film has no fused kernel for {device_type} tensors here ({choice.reason})"
    return None


def gpu_cases(device: str):
    preset, batch = ("small", BATCH) if device.startswith("cuda") else ("tiny", 2)
    shape, dtype = f"{batch}x3x{CROP}x{CROP}", "bfloat16" if device.startswith("cuda") else "float32"
    eager = with_backend("reference", training_step(device, preset, batch))
    yield Case(op="training_step_" + preset, shape=shape, dtype=dtype, bytes_moved=0,
               fused=with_backend(None, training_step(device, preset, batch)), eager=eager, compiled=None)
    if device.startswith("cuda"):   # compiling on the 2-core CPU of a dry run would take minutes
        yield Case(op=f"training_step_{preset}_compiled_network", shape=shape, dtype=dtype, bytes_moved=0,
                   fused=with_backend(None, training_step(device, preset, batch, compile_network=True)), eager=eager,
                   compiled=None)
        # issue 11's target: >= 100 steps/s at batch 64 and >= 3x the eager reference step
        yield Case(op=f"training_step_{preset}_cuda_graph", shape=f"{GRAPH_BATCH}x3x{CROP}x{CROP}", dtype=dtype,
                   bytes_moved=0, fused=with_backend(None, training_step(device, preset, GRAPH_BATCH, cuda_graph=True)),
                   eager=with_backend("reference", training_step(device, preset, GRAPH_BATCH)), compiled=None)


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_training_step(benchmark, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "fused" and fused_available(torch.device(device).type):
        pytest.skip(fused_available(torch.device(device).type))
    step = with_backend("reference" if impl == "eager" else None, training_step(device))
    benchmark.group = f"training_step small {BATCH}x3x{CROP}x{CROP}"
    step()   # warm up (allocations, first-call dispatch) outside the timed rounds
    benchmark.pedantic(step, rounds=8, warmup_rounds=1)
