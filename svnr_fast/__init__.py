"""svnr_fast: fast, exact SVNR (spatially-variant noise removal with denoising diffusion).

Two layers. The speed layer, what other SVNR codebases drop in: `Schedule` and `PoissonGaussian`
(schedule.py), `svnr_fast.reference` (the eager math of every op, the tests' oracle), `svnr_fast.ops` (the
same ops, dispatched to fused Triton / C++ / CUDA kernels; the Triton kernels live in svnr_fast.kernels),
`svnr_fast.nn` (the per-pixel FiLM module and its time embedding), `svnr_fast.sampling` (the functional
sampler, its CUDA graphs and SVNRScheduler: any per-pixel-time denoiser samples with them),
`svnr_fast.conventions` and `svnr_fast.integrations` (other codebases' conventions, the diffusers scheduler).
The application built on it, `svnr_fast.app`: the UNet, training, `denoise`, evaluation, image IO and the
`svnr` command line.

`svnr_fast.denoise(y, noise, ...)` is the main job (DESIGN.md §4); `svnr_fast.SVNRScheduler` the
diffusers-style scheduler. Importing the package never initialises CUDA, Triton or the C++ module.
"""
# the speed layer first, then the application built on it
from . import ops, reference  # noqa: I001
from .reference import TrainingSample
from .schedule import PoissonGaussian, Schedule
from .sampling import SamplerGraphs, SVNRScheduler
from .app.denoise import denoise

__version__ = "0.1.0"

__all__ = ["denoise", "SVNRScheduler", "SamplerGraphs", "ops", "reference", "Schedule", "PoissonGaussian",
           "TrainingSample", "__version__"]
