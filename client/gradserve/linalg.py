"""`gs.linalg`: numpy.linalg on traced values (and arrays and tensors), differentiable.

The same functions `np.linalg.<name>(traced)` dispatches to (see `numpy_extra`): det, slogdet,
solve, inv, cholesky, eigh, eigvalsh, svd, svdvals, qr, lstsq, matrix_power, pinv and norm with
every `ord`. The decompositions are engine primitives; the rest are compositions of them.
"""

from __future__ import annotations

from .numpy_extra import (
    EighResult,
    LstsqResult,
    QRResult,
    SlogdetResult,
    SVDResult,
    cholesky,
    det,
    eigh,
    eigvalsh,
    inv,
    lstsq,
    matrix_power,
    pinv,
    qr,
    slogdet,
    solve,
    svd,
    svdvals,
)
from .numpy_extra import linalg_norm as norm

__all__ = ["EighResult", "LstsqResult", "QRResult", "SVDResult", "SlogdetResult", "cholesky", "det", "eigh", "eigvalsh",
           "inv", "lstsq", "matrix_power", "norm", "pinv", "qr", "slogdet", "solve", "svd", "svdvals"]
