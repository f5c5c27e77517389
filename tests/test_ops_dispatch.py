"""Op registration, backend choice, the build report and import hygiene (DESIGN.md §3)."""
import shutil
import subprocess
import sys

import pytest
import torch

import svnr_fast
from svnr_fast import Schedule, info, ops
from svnr_fast.ops import backends

TABLE = Schedule().table


def op_samples():
    x = torch.rand(2, 3, 5, 7)
    tau = torch.rand(2, 1, 5, 7) * 50
    h = torch.randn(2, 6, 5, 7, requires_grad=True)
    table = torch.randn(9, 12, requires_grad=True)
    weight, bias = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    per_image = torch.tensor([0.05, 0.1])
    return {
        "gamma": (tau, TABLE),
        "time_from_variance": (torch.rand(2, 3, 5, 7) * 0.1, TABLE),
        "time_map": (torch.rand(2, 3, 5, 7) * 0.1, TABLE),
        "training_sample": (x, per_image, per_image, torch.tensor([0.2, 0.9]), TABLE, True, None, None, 3, 1, False, False,
                            0.0),
        "reverse_step": (x, torch.randn_like(x), tau, torch.tensor([1.0, 2.0]), TABLE, 0.5, torch.randn_like(x),
                         0.0, 1.0, 0, 0, True),
        "groupnorm_film": (h, torch.rand(2, 1, 5, 7) * 8, table, weight, bias, 3, 1e-5, "silu"),
        "groupnorm_silu": (h, weight, bias, 3, 1e-5),
    }


@pytest.mark.parametrize("op", list(op_samples()))
def test_opcheck_reference_backend(op, backend):
    backend("reference")
    torch.library.opcheck(getattr(torch.ops.svnr, op), op_samples()[op])


def test_every_op_is_registered_and_has_a_reference():
    for op in backends.ops():
        assert hasattr(torch.ops.svnr, op), op
        assert callable(backends.load(op, "reference"))


def test_forcing_an_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(backends.BackendUnavailable, match="backend='fastest' is not a backend"):
        ops.set_backend("fastest")
    monkeypatch.setenv("SVNR_FAST_BACKEND", "fastest")
    monkeypatch.setattr(backends, "_forced", backends._UNREAD)     # as at start-up: the variable not read yet
    with pytest.raises(backends.BackendUnavailable, match="SVNR_FAST_BACKEND='fastest' is not a backend"):
        ops.gamma(torch.rand(3), TABLE)


def test_the_backend_is_chosen_once_per_op_and_device(backend, monkeypatch):
    backend("auto")
    ops.gamma(torch.rand(3), TABLE)
    monkeypatch.setattr(backends, "choose", lambda op, device_type: pytest.fail("chosen again"))
    ops.gamma(torch.rand(3), TABLE)


def test_forcing_a_backend_that_cannot_run_here_says_why(backend):
    backend("cuda")
    choice = backends.choose("gamma", "cpu")          # gamma has no CUDA-extension kernel: automatic choice
    assert choice.backend in ("reference", "triton", "cpp")
    if "cuda" in backends.IMPLEMENTATIONS["groupnorm_film"]:
        with pytest.raises(backends.BackendUnavailable, match="the CUDA kernel runs on CUDA tensors"):
            backends.choose("groupnorm_film", "cpu")


def test_forced_triton_on_cpu_needs_the_interpreter(backend, monkeypatch):
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.choose("reverse_step", "cpu")


def test_automatic_choice_on_cpu_never_uses_the_interpreter(backend, monkeypatch):
    backend("auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op in ("gamma", "training_sample", "reverse_step"):
        assert backends.choose(op, "cpu").backend in ("cpp", "reference")


def test_missing_extension_falls_back_to_the_reference(backend, monkeypatch):
    backend("auto")
    monkeypatch.setattr(backends, "extension", lambda: (None, "ImportError: not built"))
    choice = backends.choose("groupnorm_film", "cpu")
    assert choice.backend == "reference"
    assert "svnr_fast._C is not built (ImportError: not built)" in choice.reason


def test_info_report_lists_every_op_and_device():
    text = info.report()
    for op in backends.ops():
        assert f"{op} " in text
    assert "svnr_fast._C" in text and "SVNR_FAST_BACKEND" in text


def test_svnr_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "svnr_fast.info"], capture_output=True, text=True, check=True)
    assert "reverse_step" in out.stdout


def test_import_loads_neither_triton_nor_the_extension_nor_cuda():
    code = ("import sys, svnr_fast, torch; "
            "print(sorted(m for m in ('triton', 'svnr_fast._C', 'svnr_fast.kernels') if m in sys.modules), "
            "torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False"]


def test_extension_was_built_with_cuda_where_nvcc_exists():
    ext, error = backends.extension()
    assert ext is not None, f"svnr_fast._C did not load: {error}"
    build = ext.build_info()
    assert build["cxx_compiler"]
    if shutil.which("nvcc"):
        assert build["cuda"], "nvcc is on PATH but svnr_fast._C was built without its CUDA sources"
        assert build["cuda_archs"]


def test_public_api():
    assert svnr_fast.Schedule is Schedule
    for name in ("gamma", "time_from_variance", "time_map", "training_sample", "reverse_step", "groupnorm_film",
                 "groupnorm_silu"):
        assert callable(getattr(svnr_fast.ops, name)) and callable(getattr(svnr_fast.reference, name))


def test_the_package_exposes_the_main_job_and_the_scheduler():
    import svnr_fast
    from svnr_fast.app.denoise import denoise
    assert svnr_fast.denoise is denoise

    class ZeroNoise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("variance_table", Schedule().table)

        def forward(self, condition, x, tau):
            return torch.zeros_like(x)

    y = torch.full((3, 16, 16), 0.5)
    out = svnr_fast.denoise(y, (0.0, 0.0), model=ZeroNoise())
    assert torch.equal(out, y)                   # no noise: time 0 everywhere, nothing to do
    assert svnr_fast.SVNRScheduler().config["num_train_timesteps"] == 1000


def _imports(path):
    """(module, names) of every `from ... import ...` in a file."""
    import ast
    return [((node.module or "").split("."), {alias.name for alias in node.names})
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)]


def test_the_layers_import_in_one_direction():
    """The reference is the tests' oracle and the CPU implementation behind the ops: application code never
    imports it. The speed layer never imports the application (the package's __init__ exports `denoise`), and
    the Triton kernels import nothing from the package."""
    from pathlib import Path

    root = Path(svnr_fast.__file__).parent
    for path in sorted((root / "app").rglob("*.py")):
        for module, names in _imports(path):
            assert "reference" not in module and "reference" not in names, f"{path.relative_to(root)} imports the reference"
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    for path in sorted(kernels.glob("*.py")):
        for module, names in _imports(path):
            assert "svnr_fast" not in module, f"kernels/{path.name} imports from svnr_fast"
    speed_layer = [p for p in root.rglob("*.py") if "app" not in p.relative_to(root).parts and p.name != "__init__.py"
                   or p.parent.name in ("ops", "integrations")]
    assert len(speed_layer) >= 10
    for path in speed_layer:
        for module, names in _imports(path):
            assert "app" not in module and "app" not in names, f"{path.relative_to(root)} imports the application"
