"""GPU kernels: the same kernel table over CuPy arrays, fused groups as `cupy.ElementwiseKernel`s.

    from gradserve_engine.gpu import GpuKernels
    plan = Plan(graph, kernels=GpuKernels())          # numpy in, numpy out
    plan.run(inputs)                                  # inputs moved to the device once, results back once
    plan = Plan(graph, kernels=GpuKernels(to_host=False))
    plan.run_values([cupy arrays ...])                # stays on the device (benchmarks, chained calls)

The per-op table is `kernel_table(cupy)` (the registry's reference kernels over an array
namespace), with `scatter_add` through `cupyx.scatter_add`. A plan's constants are uploaded
once, when the plan is built. Fused groups become one elementwise CUDA kernel each: CuPy
broadcasts the inputs (each reshaped to its alignment against the group's shape) and NVRTC
compiles the body once per group signature (CuPy caches it on disk). Each member is one C++
statement on the member's own type, so float32 stays float32 as in numpy.

CuPy is optional: importing this module never needs it; `GpuKernels()` raises a RuntimeError
that says what is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from .fusion import Group, KernelSet
from .ir import Node
from .ops import PRIMITIVES, kernel_table
from .ops.dtypes import C_TYPES


def cupy_status() -> tuple[Any, str]:
    """(the cupy module or None, a line saying what is there or why not)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library mismatch at import
        return None, f"cupy is not importable ({type(e).__name__}: {e}); install cupy-cuda12x (or -cuda11x)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, f"cupy {cupy.__version__} finds no CUDA device ({type(e).__name__}: {e})"
    if n < 1:
        return None, f"cupy {cupy.__version__} finds no CUDA device"
    return cupy, f"cupy {cupy.__version__}, {n} device(s)"


class GpuKernels(KernelSet):
    """Plans on one CUDA device through CuPy. `to_host`: results come back as numpy arrays."""

    name = "gpu"
    in_place = True  # an elementwise CUDA thread reads its element before it writes it
    epilogues = False  # an ElementwiseKernel computes no reductions: sums stay separate steps

    def __init__(self, fuse: bool = True, to_host: bool = True):
        cp, why = cupy_status()
        if cp is None:
            raise RuntimeError(f"the gpu kernels need CuPy and a CUDA device: {why}")
        import cupyx

        table = kernel_table(cp)
        table["scatter_add"] = _scatter_add(cp, cupyx)
        super().__init__(table, fuse=fuse)
        self.cp = cp
        self.to_host = to_host
        self.reason = why

    def upload(self, a: Any) -> Any:
        return self.cp.asarray(a)

    def result(self, a: Any, mode: int) -> Any:
        cp = self.cp
        if self.to_host:
            host = cp.asnumpy(a)  # a copy: never aliases an input
            return host[()] if mode == 2 else host
        return a.copy() if mode == 1 else a

    def compile_group(self, group: Group) -> Callable[..., tuple[Any, ...]] | None:
        cp = self.cp
        in_params, out_params, body = elementwise_source(group)
        name = "gradserve_fused_" + hashlib.sha256(group.signature().encode()).hexdigest()[:16]
        kernel = cp.ElementwiseKernel(in_params, out_params, body, name)
        aligned = group.aligned
        shape = group.shape
        out_dtypes = [group.members[j].dtype for j in group.outputs]

        def run(arrays: Sequence[Any], outs: Sequence[Any]) -> tuple[Any, ...]:
            ins = [cp.asarray(a).reshape(al) for a, al in zip(arrays, aligned, strict=True)]
            res = [o if o is not None else cp.empty(shape, dt) for o, dt in zip(outs, out_dtypes, strict=True)]
            kernel(*ins, *res)
            return tuple(res)

        # compile now (NVRTC, or CuPy's disk cache), so that plan.compile_seconds covers it
        tiny = [cp.zeros((1,) * len(shape), dt) for dt in group.input_dtypes]
        kernel(*tiny, *(cp.empty((1,) * len(shape), dt) for dt in out_dtypes))
        cp.cuda.Stream.null.synchronize()
        return run

    def describe(self) -> str:
        return f"gpu: {self.reason}"


def _scatter_add(cp: Any, cupyx: Any) -> Callable[..., Any]:
    def kernel(x, idx, upd, *, axis):
        out = cp.array(x, copy=True)
        cupyx.scatter_add(out, (slice(None),) * axis + (idx,), upd)
        return out

    return kernel


def _c_expr(n: Node, args: list[str], in_dtypes: list[str]) -> str:
    """One member's value as a C++ expression, its primitive's `cuda` form (CUDA's math overloads
    keep float as float)."""
    cuda = PRIMITIVES[n.op].cuda
    if cuda is None:
        raise NotImplementedError(f"no CUDA form for {n.op}")
    return cuda(args, n.dtype, in_dtypes)


def elementwise_source(group: Group) -> tuple[str, str, str]:
    """(in_params, out_params, body) of the group's `cupy.ElementwiseKernel`."""
    in_params = ", ".join(f"{dt} x{k}" for k, dt in enumerate(group.input_dtypes))
    out_params = ", ".join(f"{group.members[j].dtype} o{k}" for k, j in enumerate(group.outputs))
    lines = []
    for j, n in enumerate(group.members):
        args = [f"v{o}" if o >= 0 else f"x{-1 - o}" for o in group.operands[j]]
        in_dt = [group.members[o].dtype if o >= 0 else group.input_dtypes[-1 - o] for o in group.operands[j]]
        lines.append(f"const {C_TYPES[n.dtype]} v{j} = {_c_expr(n, args, in_dt)};")
    lines += [f"o{k} = v{j};" for k, j in enumerate(group.outputs)]
    return in_params, out_params, "\n".join(lines)
