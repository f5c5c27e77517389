"""The fast SVNR ops: `svnr::` dispatcher ops with fake kernels and one kernel per device (DESIGN.md §1.7, §3).

The functions here have the signatures and results of `svnr_fast.reference`. Each checks its arguments
(`_checks`), then calls the registered op `torch.ops.svnr.<op>`, whose CPU or CUDA kernel runs the backend
chosen once for that device (`backends`). Loops that must not synchronise with the GPU (the sampler, the
training step) validate once and then call `torch.ops.svnr.*` directly.

One module per op: lookup (gamma, time_from_variance, time_map), training_sample, reverse_step,
groupnorm_film (groupnorm_film, groupnorm_silu); each holds the op's schema, fake kernel, backends and public function.

The ops are defined with `torch.library.Library` rather than `custom_op` (whose Python dispatch layer costs
~18 us a call) or `triton_op` (which breaks opcheck and torch.compile on machines without a GPU driver,
DESIGN.md §3).
"""
# the ops register in this order, which `svnr info` keeps
from .lookup import gamma, time_from_variance, time_map, top_up  # noqa: I001
from .training_sample import training_sample
from .reverse_step import reverse_step
from .groupnorm_film import groupnorm_film, groupnorm_silu
from ..reference import TrainingSample
from .backends import BackendUnavailable, set_backend

__all__ = ["gamma", "time_from_variance", "time_map", "top_up", "training_sample", "reverse_step", "groupnorm_film",
           "groupnorm_silu", "TrainingSample", "BackendUnavailable", "set_backend"]
