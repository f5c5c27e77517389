"""Training SVNR denoisers: samples, loss, optimiser, schedule, EMA, the loop and its checkpoints.

Three schemes (DESIGN.md §1.4), all drawing their samples on the device:
- "svnr" (default, the paper): y' and x_t from `svnr::training_sample` with the Brownian-bridge
  correlation between the noise of x_t and that of the condition y';
- "uncorrelated" (the ablation): the same op with `correlated=False`;
- "baseline" (a conventional conditional diffusion model): scalar tau ~ U(0, T) per image, x_t = x0 +
  sqrt(gamma(tau)) eps', condition = the observed y with its true Poisson-Gaussian noise, constant
  time map.
The loss is a masked MSE on the network output: the noise (epsilon) or EDM's preconditioned target
(see svnr_fast.app.models). AdamW, linear warm-up + cosine decay, gradient clipping, EMA weights, bf16
autocast on CUDA. Every random draw of step s on rank r comes from generators seeded by (seed, s, r),
so a run is deterministic on a CPU and a resumed run continues exactly; the loop synchronises with
the device only every `log_every` steps.
"""
from .config import NOISE_DISTRIBUTIONS, RUNTIME_OPTIONS, SCHEMES, TIME_MAPS, TrainConfig, World
from .loop import fit
from .step import (NetworkOutput, Sample, TrainState, ema_decay_at, heldout_psnr, lr_at, make_optimizer, make_sample,
                   masked_mse, new_state, observed_sample, stream_seed, train_step, update_ema)

__all__ = ["TrainConfig", "World", "SCHEMES", "NOISE_DISTRIBUTIONS", "TIME_MAPS", "RUNTIME_OPTIONS", "fit",
           "NetworkOutput", "Sample", "TrainState", "ema_decay_at", "heldout_psnr", "lr_at", "make_optimizer",
           "make_sample", "masked_mse", "new_state", "observed_sample", "stream_seed", "train_step", "update_ema"]
