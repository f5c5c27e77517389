"""Whole steps without host syncs, and replayed from CUDA graphs (DESIGN.md §6): a training step and a
sampling loop read nothing back to the host (counted on the CPU), and a CUDA graph of a training step gives
the eager step's results (CUDA)."""
import collections
import contextlib
import traceback

import pytest
import torch
from conftest import requires_cuda

from svnr_fast import Schedule
from svnr_fast.app import training
from svnr_fast.app.cli import train
from svnr_fast.app.models import SVNRUNet, preset
from svnr_fast.sampling import _loop, plan_steps, sample
from svnr_fast.app.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# what reads a tensor's value back to the host (on a GPU: a synchronisation)
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy")


@contextlib.contextmanager
def counting_host_reads():
    """Counts every host read of a tensor value inside the block, by call site."""
    calls = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            calls[(name, traceback.format_stack(limit=3)[0].strip().splitlines()[0])] += 1
            return originals[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_host_reads():
    with counting_host_reads() as calls:
        x = torch.ones(2)
        x.sum().item()
        bool(x.any())
        x.cpu()
    assert sum(calls.values()) == 3


@pytest.mark.parametrize("options", [{}, {"time_map": "observed"}, {"scheme": "uncorrelated"}, {"scheme": "baseline"},
                                     {"parametrisation": "epsilon"}])
def test_a_training_step_reads_nothing_back(options):
    config = TrainConfig(preset="tiny", batch_size=2, crop=16, steps=10, warmup_steps=0, **options)
    state = training.new_state(config, "cpu")
    network = training.NetworkOutput(state.model)
    x0 = torch.rand(2, 3, 16, 16)
    training.train_step(state, network, x0, config)      # the first step may initialise lazily
    with counting_host_reads() as calls:
        loss = training.train_step(state, network, x0, config)
    assert not calls, dict(calls)
    assert torch.isfinite(loss) and state.step == 2


def test_a_sampling_loop_reads_nothing_back():
    torch.manual_seed(0)
    model = SVNRUNet(preset("tiny")).eval()
    table = Schedule().table
    y = torch.rand(2, 3, 16, 16)
    tau = torch.rand(2, 1, 16, 16) * 30
    plan = plan_steps(tau, 3)
    with torch.inference_mode(), counting_host_reads() as calls:
        _loop(model, y, y, tau, table, plan, 0.5, 0.0, 1.0, 7)
    assert not calls, dict(calls)
    with torch.inference_mode():      # the public entry validates once, up front, then runs that loop
        torch.testing.assert_close(sample(model, y, y, tau, table, steps=3, eta=0.5, clamp=(0.0, 1.0), seed=7),
                                   _loop(model, y, y, tau, table, plan, 0.5, 0.0, 1.0, 7), rtol=0, atol=0)


def test_cuda_graph_training_is_refused_where_it_cannot_run(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (32, 32), (120, 60, 30)).save(folder / "a.png")
    code = train.main(["--data", str(folder), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "2",
                       "--batch-size", "2", "--crop", "16", "--workers", "0", "--no-progress", "--device", "cpu",
                       "--cuda-graph"])
    assert code == 2
    assert "--cuda-graph replays one process's steps on a CUDA device (here: cpu" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("options", [{}, {"time_map": "observed"}, {"scheme": "baseline"}])
def test_captured_training_steps_equal_eager_ones(options):
    config = TrainConfig(preset="tiny", batch_size=4, crop=32, steps=20, warmup_steps=2, **options)
    batches = [torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)).cuda() for i in range(8)]
    results = []
    for graph in (None, training.StepGraph()):
        state = training.new_state(config, "cuda")
        network = training.NetworkOutput(state.model)
        losses = [training.train_step(state, network, x0, config, 0, graph).clone() for x0 in batches]
        results.append((torch.stack(losses), [p.detach().clone() for p in state.ema.parameters()]))
    (eager_losses, eager_ema), (graph_losses, graph_ema) = results
    assert graph is not None and graph.graph is not None        # steps 4..8 replayed
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for got, want in zip(graph_ema, eager_ema):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_launch_counts_see_the_graph_replace_the_step():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import count_launches

    counts = count_launches.training_counts("tiny", 2, 16)
    assert counts["eager"] > 10 * counts["cuda_graph"] > 10
    sampling = count_launches.sampling_counts("tiny", 1, 16, 2)
    assert sampling["eager_per_step"] > 20 and sampling["cuda_graph_per_step"] == 0.5
