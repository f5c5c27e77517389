"""svnr_fast: fast, exact SVNR (spatially-variant noise removal with denoising diffusion).

`svnr_fast.denoise(y, noise, ...)` is the main job (DESIGN.md §4); `svnr_fast.SVNRScheduler` the
diffusers-style scheduler. `svnr_fast.reference` holds the eager PyTorch version of every op,
`svnr_fast.ops` the dispatched fast one with the same signatures. Importing the package never
initialises CUDA, Triton or the C++ module.
"""
from . import ops, reference
from .reference import TrainingSample
from .schedule import PoissonGaussian, Schedule
from .sampling import SamplerGraphs, SVNRScheduler
from .denoise import denoise   # the function; its module stays importable as `from svnr_fast.denoise import ...`

__version__ = "0.1.0"

__all__ = ["denoise", "SVNRScheduler", "SamplerGraphs", "ops", "reference", "Schedule", "PoissonGaussian",
           "TrainingSample", "__version__"]
