"""`gs.fft`: numpy.fft's transforms with complex values as (real part, imaginary part) pairs.

The engine's values are real, so `np.fft.fft(traced)` raises; these take and give the two parts
as separate arrays, with numpy's `n`, `axis`/`s`/`axes` and `norm`, and differentiate like any
other function: `re, im = gs.fft.rfft_parts(x)`, then `np.sum(re**2 + im**2)` is a power.
"""

from __future__ import annotations

from .numpy_extra import fft2_parts, fft_parts, ifft2_parts, ifft_parts, irfft_parts, rfft_parts

__all__ = ["fft2_parts", "fft_parts", "ifft2_parts", "ifft_parts", "irfft_parts", "rfft_parts"]
