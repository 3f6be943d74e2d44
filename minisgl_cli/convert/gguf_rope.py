"""Recovering HF's llama3 `rope_scaling` from the `rope_freqs` factors llama.cpp stores instead.

llama.cpp divides each rotary frequency by a stored factor r_i. HF computes the same factors from four
numbers: factor f, low/high_freq_factor and original_max_position_embeddings L. With wavelength w_i:
r_i = 1 for short waves (w_i < L/high), f for long ones (w_i > L/low), and in between
1 / ((1 - s_i) / f + s_i) with s_i = (L / w_i - low) / (high - low). So f = max r, and the in-between
factors give s_i, which is linear in 1 / w_i: a line fit recovers low/L and high/L. Only those ratios
matter, so L comes from the file when it says, else low is taken as 1 (as in every Llama 3.x release).
"""

from __future__ import annotations

import math

import numpy as np

from minisgl_cli.engine.models.config import Llama3RopeScaling

# The factors are float32; this much slack separates "exactly 1 or f" from "in between".
_TOLERANCE = 1e-5


def llama3_factors(scaling: Llama3RopeScaling, theta: float, rotary_dim: int) -> np.ndarray:
    """The per-frequency factors `scaling` gives, as llama.cpp would store them."""
    wavelengths = _wavelengths(theta, rotary_dim)
    length = scaling.original_max_position_embeddings
    smooth = (length / wavelengths - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    between = 1.0 / ((1.0 - smooth) / scaling.factor + smooth)
    long_wave = wavelengths > length / scaling.low_freq_factor
    short_wave = wavelengths < length / scaling.high_freq_factor
    return np.where(short_wave, 1.0, np.where(long_wave, scaling.factor, between))


def _wavelengths(theta: float, rotary_dim: int) -> np.ndarray:
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    return 2 * math.pi * theta**exponents


def recover_llama3_scaling(
    freq_factors: np.ndarray, theta: float, rotary_dim: int, original_context: int | None
) -> Llama3RopeScaling | None:
    """The llama3 scaling that yields `freq_factors`; None if they are all 1 (no scaling).

    Raises ValueError when the factors do not fit the llama3 shape (the caller names the file).
    """
    ratios = np.asarray(freq_factors, dtype=np.float64)
    if ratios.shape != (rotary_dim // 2,):
        raise ValueError(f"expected {rotary_dim // 2} factors, found shape {ratios.shape}")
    factor = float(ratios.max())
    if factor <= 1 + _TOLERANCE:
        return None
    between = (ratios > 1 + _TOLERANCE) & (ratios < factor * (1 - _TOLERANCE))
    if between.sum() < 2:
        raise ValueError("too few frequencies between the scaled and unscaled bands to recover the scaling")
    smooth = (1 / ratios[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / _wavelengths(theta, rotary_dim)[between], smooth, 1)
    # smooth = L/(high-low) * (1/w) - low/(high-low): slope/intercept fix low/L and high/L.
    if original_context is None:
        low = 1.0
        original_context = round(-slope / intercept)
    else:
        low = -intercept * original_context / slope
    high = low + original_context / slope
    scaling = Llama3RopeScaling(
        factor=_tidy(factor),
        low_freq_factor=_tidy(low),
        high_freq_factor=_tidy(high),
        original_max_position_embeddings=int(original_context),
    )
    if not np.allclose(llama3_factors(scaling, theta, rotary_dim), ratios, rtol=1e-4, atol=0):
        raise ValueError("the factors do not follow llama3's rope scaling")
    return scaling


def _tidy(value: float) -> float:
    # The fit lands within ~1e-6 of the round numbers configs use (8.0, 1.0, 4.0); write those.
    return float(round(value, 4))
