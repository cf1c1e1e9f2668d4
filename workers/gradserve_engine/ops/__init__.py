"""The primitive ops of the IR, one registration each, grouped by family (see `core`).

Importing this package registers every primitive; the engine's package imports it first, so
the registry is complete wherever an engine module runs.
"""

from __future__ import annotations

import numpy as np

from . import binary, control, indexing, linalg, reductions, shape, unary
from .core import PRIMITIVES, Kernel, Primitive, infer, kernel_table, names_where

KERNELS = kernel_table(np)  # the numpy reference kernels every faster path is tested against
# the planner's buffer traits, queried once: kernels that take out=, may write over an operand,
# or return a view of their operand
OUT_CAPABLE = names_where(lambda p: p.out)
IN_PLACE = names_where(lambda p: p.in_place)
VIEWS = names_where(lambda p: p.view)

__all__ = ["IN_PLACE", "KERNELS", "OUT_CAPABLE", "PRIMITIVES", "VIEWS", "Kernel", "Primitive", "binary", "control", "indexing",
           "infer", "kernel_table", "linalg", "reductions", "shape", "unary"]
