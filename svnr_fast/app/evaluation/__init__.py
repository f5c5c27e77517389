"""`svnr eval`: SVNR against the conventional diffusion baseline, the no-correlation ablation and
classical denoisers, on clean photos noised synthetically (the claims of the paper, issue 7).

Data. `--data DIR` is a folder of clean photos (searched recursively), or a dataset root with train/
and heldout/ subfolders (as scripts/make_dataset.py writes), of which heldout/ is used; a single image
file works too. Gray photos are repeated to RGB. Each photo is centre-cropped to at most `crop` x `crop`
pixels (0: whole photos), which bounds the run time on a CPU. For every photo and level
(sigma_r, sigma_s) the noise is Poisson-Gaussian (DESIGN.md §1.1, not clipped), drawn from a seed made
of `--seed`, the photo's name and the level, so a photo's noisy version does not depend on which other
photos, levels or methods are evaluated.

Noise parameters. Methods that need (sigma_r, sigma_s) (SVNR, the ablation, x0hat, the classical
denoisers) get the ones estimated from the noisy photo (svnr_fast.app.noise_estimation; `--noise estimated`,
the default: what a user has) or the true level (`--noise true`). The baseline needs none: it is
conditioned on the noisy photo itself.

Methods (`--methods`; each is skipped, with the reason printed, when its model or package is missing):
- `noisy`: the noisy input itself.
- `svnr`: top-up y' and time map tau* (DESIGN.md §1.3), then the sampler from (y', tau*) with the
  paper's ceil(max tau*) steps (per photo), eta = 1; `svnr-N`: N steps. x0_hat is clamped to [0, 1]
  at every step, as in `svnr denoise`.
- `x0hat`: one network evaluation, `model.predict(y', y', tau*).x0_hat`, clamped to [0, 1] (`svnr-1`
  computes the same picture through one reverse step).
- `ablation` / `ablation-N`: the model trained with `--no-correlation`, sampled exactly like SVNR
  from the same y' (so the two are compared on identical inputs).
- `baseline` (all T steps; shown as `baseline-1000` for T = 1000) / `baseline-N` (respaced to N equal
  steps): the model trained with `--baseline`, from x_T = 0.5 + sqrt(gamma(T)) z with the observed y
  as the condition (svnr_fast.sampling.sample_baseline).
- `bm3d` (only when the optional, non-commercial `bm3d` package imports; never a dependency), `nlm`
  (skimage.restoration.denoise_nl_means) and `wavelet` (skimage.restoration.denoise_wavelet): on the
  generalised-Anscombe-stabilised photo (`anscombe`, unit noise variance, so sigma = 1), mapped back
  with the closed-form exact unbiased inverse (`inverse_anscombe`).

Metrics per method, level and photo, then their mean over photos. Outputs are clipped to [0, 1]
first (what a saved photo holds; the noisy row too).
- PSNR and SSIM: skimage.metrics with data_range=1 (SSIM over RGB with channel_axis).
- HF ratio (`high_frequency_ratio`): the energy of a high-pass of the output over that of the clean
  photo. The high-pass is `H(x) = x - G_1 * x`, G_1 a Gaussian of standard deviation 1 pixel (truncated
  at 4 sigma, reflected borders, per channel), which passes mostly the top octave of frequencies; the
  energy is the sum of H(x)^2 over pixels and channels. ~1: texture kept; < 1: smoothed away; > 1:
  noise or artefacts added.
- NFE: network evaluations per photo (0 for noisy and classical rows).
- seconds: wall time per photo: a batched network call counts 1/batch of its time for each photo; the
  time of the noise estimate (when estimated) and of the top-up are added where a method uses them.

Outputs in `--out`: results.csv (the mean rows, which are also the data of the plot), per_image.csv,
results.md (setup and the table), grid-<level>.png per level (the first photo: noisy | SVNR | baseline
| ablation | best classical | clean, with whatever ran) and quality_vs_steps.svg (PSNR against NFE,
log axis, one panel per level; written by hand: matplotlib is not a dependency).

Network calls are batched across photos of the same shape (and, for `svnr`/`ablation`, the same step
count), under torch.inference_mode, through the fixed-length sampler (svnr_fast.sampling) and the
fused `svnr::reverse_step` op.
"""
