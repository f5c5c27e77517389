"""svnr_fast: fast, exact SVNR (spatially-variant noise removal with denoising diffusion).

`svnr_fast.reference` holds the eager PyTorch version of every op, `svnr_fast.ops` the dispatched fast
one with the same signatures. Importing the package never initialises CUDA, Triton or the C++ module.
"""
from . import ops, reference
from .reference import TrainingSample
from .schedule import PoissonGaussian, Schedule

__version__ = "0.1.0"

__all__ = ["ops", "reference", "Schedule", "PoissonGaussian", "TrainingSample", "__version__"]
