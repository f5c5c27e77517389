"""The methods `svnr eval` compares, the noise levels, and the classical denoisers on the generalised
Anscombe transform."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_LEVELS = ((0.02, 0.05), (0.05, 0.10), (0.10, 0.20))
DEFAULT_METHODS = ("noisy", "svnr", "svnr-1", "svnr-2", "svnr-4", "svnr-8", "x0hat", "baseline", "baseline-25",
                   "ablation", "bm3d", "nlm", "wavelet")
CLASSICAL = ("bm3d", "nlm", "wavelet")
STEPPED = ("svnr", "ablation", "baseline")           # families that take a step count: svnr-8, baseline-25
MODEL_OF_FAMILY = {"svnr": "svnr", "x0hat": "svnr", "ablation": "ablation", "baseline": "baseline"}
SCHEME_OF_MODEL = {"svnr": "svnr", "ablation": "uncorrelated", "baseline": "baseline"}   # training.SCHEMES
TRAIN_FLAG = {"svnr": "", "ablation": " --no-correlation", "baseline": " --baseline"}
METHOD_CHOICES = ("noisy, svnr, svnr-N, x0hat, ablation, ablation-N, baseline, baseline-N, bm3d, nlm, wavelet "
                  "(N: network evaluations)")


@dataclass(frozen=True)
class Method:
    name: str              # as in the tables: "svnr", "svnr-4", "baseline-1000", "x0hat", "nlm", ...
    family: str            # noisy | svnr | x0hat | ablation | baseline | classical
    steps: int | None      # sampler steps; None: ceil(max tau*) per photo (svnr, ablation), all T (baseline)

    @property
    def model(self) -> str | None:
        """Which model (svnr, ablation, baseline) the method runs, if any."""
        return MODEL_OF_FAMILY.get(self.family)


def parse_method(text: str) -> Method:
    name = text.strip().lower()
    if name == "noisy":
        return Method(name, "noisy", None)
    if name == "x0hat":
        return Method(name, "x0hat", 1)
    if name in CLASSICAL:
        return Method(name, "classical", None)
    family, dash, count = name.partition("-")
    if family in STEPPED:
        if not dash:
            return Method(name, family, None)
        if count.isdigit() and int(count) >= 1:
            return Method(f"{family}-{int(count)}", family, int(count))
    raise ValueError(f"unknown method {text!r}; choose from {METHOD_CHOICES}")


def parse_level(text: str) -> tuple[float, float]:
    """'SIGMA_R,SIGMA_S' -> (sigma_r, sigma_s)."""
    try:
        sigma_r, sigma_s = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"a noise level is SIGMA_R,SIGMA_S such as 0.05,0.10; got {text!r}") from None
    if not (math.isfinite(sigma_r) and math.isfinite(sigma_s)) or sigma_r < 0 or sigma_s < 0:
        raise ValueError(f"noise level {text!r}: sigma_r and sigma_s must be finite and >= 0")
    if sigma_r == sigma_s == 0:
        raise ValueError(f"noise level {text!r} adds no noise: there would be nothing to denoise")
    return sigma_r, sigma_s


def level_label(level: tuple[float, float]) -> str:
    return f"{level[0]:g},{level[1]:g}"


GAUSSIAN_ONLY = 1e-12    # sigma_s^2 below this: the noise is treated as purely Gaussian (read noise only)


def anscombe(y: np.ndarray, sigma_r: float, sigma_s: float) -> np.ndarray:
    """The generalised Anscombe transform for var(y | x) = sigma_r^2 + sigma_s^2 x (unit variance after).

    With alpha = sigma_s^2 the noise is that of y = alpha p + n, p ~ Poisson(x / alpha), n ~ N(0, sigma_r^2)
    (Murtagh, Starck & Bijaoui 1995; Makitalo & Foi 2013), and
    f(y) = (2 / alpha) sqrt(max(alpha y + 3/8 alpha^2 + sigma_r^2, 0)); f(y) = y / sigma_r when alpha = 0.
    """
    alpha = sigma_s**2
    if alpha < GAUSSIAN_ONLY:
        return y / sigma_r
    return (2 / alpha) * np.sqrt(np.maximum(alpha * y + 0.375 * alpha**2 + sigma_r**2, 0))


def inverse_anscombe(d: np.ndarray, sigma_r: float, sigma_s: float, unbiased: bool = True) -> np.ndarray:
    """Maps a (denoised) stabilised image back to the signal domain.

    unbiased=True (for denoised images): the closed-form approximation of the exact unbiased inverse of
    Makitalo & Foi ("Optimal inversion of the generalized Anscombe transformation for Poisson-Gaussian
    noise", IEEE TIP 22(1), 2013). In units of alpha = sigma_s^2, with s = sigma_r / alpha,
    I(D) = D^2/4 + sqrt(3/2)/4 D^-1 - 11/8 D^-2 + 5/8 sqrt(3/2) D^-3 - 1/8 - s^2, clipped at 0, and the
    signal is alpha I(D). It inverts E[f(y) | x] (what an ideal denoiser returns), not f(x): the algebraic
    inverse of a denoised image is biased low (Jensen). Below D = sqrt(3/2) (under f of zero
    signal) the series turns upwards, so such D are mapped to 0.
    unbiased=False: the algebraic inverse, alpha ((D/2)^2 - 3/8 - s^2), exact for f of noise-free values.
    Pure read noise (alpha = 0): y = sigma_r D, which is both.
    """
    alpha = sigma_s**2
    if alpha < GAUSSIAN_ONLY:
        return d * sigma_r
    s2 = (sigma_r / alpha) ** 2
    if not unbiased:
        return alpha * ((d / 2) ** 2 - 0.375 - s2)
    root = math.sqrt(1.5)
    safe = np.maximum(d, root)
    inverse = (safe**2 / 4 + root / 4 / safe - 11 / 8 / safe**2 + 5 / 8 * root / safe**3 - 1 / 8 - s2)
    return alpha * np.where(d < root, 0.0, np.maximum(inverse, 0.0))


# the optional packages the classical methods need beyond scikit-image: method -> (module, why it is missing)
OPTIONAL_PACKAGES = {
    "bm3d": ("bm3d", "the optional `bm3d` package is not installed (non-commercial licence, never a dependency of "
                     "svnr_fast; `pip install bm3d` to include it)"),
    "wavelet": ("pywt", "skimage.restoration.denoise_wavelet needs PyWavelets, which is not installed "
                        "(`pip install PyWavelets` to include it)"),
}


def classical_unavailable(name: str) -> str | None:
    """Why the classical method cannot run here (None: it can)."""
    if name not in OPTIONAL_PACKAGES:
        return None
    module, reason = OPTIONAL_PACKAGES[name]
    try:
        __import__(module)
    except ImportError:
        return reason
    return None


def classical_denoise(name: str, y: np.ndarray, sigma_r: float, sigma_s: float) -> np.ndarray:
    """Denoises y (H, W, 3) float64 with a classical method on its generalised-Anscombe transform."""
    if sigma_r == sigma_s == 0:
        return y.copy()
    z = anscombe(y, sigma_r, sigma_s)           # noise of unit variance
    if name == "nlm":
        from skimage.restoration import denoise_nl_means
        # h = 0.6 sigma with fast_mode: the setting of scikit-image's own example
        d = denoise_nl_means(z, h=0.6, sigma=1.0, fast_mode=True, patch_size=5, patch_distance=6, channel_axis=-1)
    elif name == "wavelet":
        from skimage.restoration import denoise_wavelet
        d = denoise_wavelet(z, sigma=1.0, method="BayesShrink", mode="soft", channel_axis=-1, convert2ycbcr=True,
                            rescale_sigma=True)
    elif name == "bm3d":
        import bm3d
        d = bm3d.bm3d_rgb(z, 1.0)
    else:
        raise ValueError(f"unknown classical method {name!r}; choose one of {', '.join(CLASSICAL)}")
    return inverse_anscombe(np.asarray(d, dtype=np.float64), sigma_r, sigma_s)
