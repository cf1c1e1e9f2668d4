#!/usr/bin/env python
"""Rematerialisation: a deep tanh MLP's gradient with and without `gs.checkpoint`, beside PyTorch's
`torch.utils.checkpoint`, in one run.

    python bench/checkpoint.py                 # 20 layers of 1024, batch 256, float32
    python bench/checkpoint.py --block 4       # checkpoint segments of 4 layers instead of 1
    python bench/checkpoint.py --smoke         # 3 layers of 32, batch 8: the same code in seconds (the tests)

Each variant's gradient is checked against the plain one before timing. Reported per variant:
the median time of one gradient and, for gradserve, the peak of numpy's allocations during one
gradient (tracemalloc, after the recycled buffers are let go, so every buffer the call needs is
counted), each also as a ratio to the variant without checkpointing. PyTorch's CPU allocations are
not visible to tracemalloc: its rows give times only.

A layer `tanh(h @ W + b)` keeps only what its backward pass reads (its input and output), so
checkpointing single layers saves little and costs one more forward pass; segments of several
layers keep one input where they kept every layer's (`--block`).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

import gradserve as gs
from gradserve_engine import buffers

FULL = {"layers": 20, "width": 1024, "batch": 256, "repeat": 5}
SMOKE = {"layers": 3, "width": 32, "batch": 8, "repeat": 2}


def problem(layers: int, width: int, batch: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(0)
    params = [((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
               np.zeros(width, np.float32)) for _ in range(layers)]
    return params, rng.standard_normal((batch, width)).astype(np.float32)


def segments(block: int, layers: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, layers)) for i in range(0, layers, block)]


def gradserve_grad(params: list, block: int | None) -> Callable[[np.ndarray], Any]:
    def run(ps: list, h: Any) -> Any:
        for w, b in ps:
            h = np.tanh(h @ w + b)
        return h

    def loss(ps: list, x: Any) -> Any:
        h = x
        if block is None:
            h = run(ps, h)
        else:
            for lo, hi in segments(block, len(ps)):
                h = gs.checkpoint(run)(ps[lo:hi], h)
        return np.mean(h * h)

    g = gs.grad(loss)
    return lambda x: g(params, x)


def torch_grad(params: list, block: int | None) -> Callable[[np.ndarray], Any]:
    import torch
    from torch.utils.checkpoint import checkpoint

    tps = [(torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)) for w, b in params]

    def run(h: Any, lo: int, hi: int) -> Any:
        for w, b in tps[lo:hi]:
            h = torch.tanh(h @ w + b)
        return h

    def grad(x: np.ndarray) -> Any:
        h = torch.tensor(x)
        if block is None:
            h = run(h, 0, len(tps))
        else:
            for lo, hi in segments(block, len(tps)):
                h = checkpoint(run, h, lo, hi, use_reentrant=False)
        return torch.autograd.grad((h * h).mean(), [t for pair in tps for t in pair])

    return grad


def peak_bytes(fn: Callable[[], Any]) -> int:
    gc.collect()
    buffers.RECYCLER.clear()  # every buffer the call takes is then a fresh allocation, counted
    tracemalloc.start()
    try:
        out = fn()
        del out
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=1, help="layers per checkpointed segment (default 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, two calls each: for the tests, the numbers mean nothing")
    args = ap.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    params, x = problem(size["layers"], size["width"], size["batch"])
    print(f"# {size['layers']} layers of {size['width']}, batch {size['batch']}, float32; checkpoint segments of "
          f"{args.block} layer(s); median of {size['repeat']} calls" + ("; smoke run: the numbers mean nothing"
                                                                          if args.smoke else ""), flush=True)
    variants = {"gradserve": gradserve_grad(params, None), "gradserve, checkpoint": gradserve_grad(params, args.block),
                "pytorch": torch_grad(params, None), "pytorch, checkpoint": torch_grad(params, args.block)}
    want = [np.asarray(v) for pair in variants["gradserve"](x) for v in pair]
    for name, fn in variants.items():
        got = fn(x)
        flat = [np.asarray(v.detach() if hasattr(v, "detach") else v) for v in
                (got if name.startswith("pytorch") else [v for pair in got for v in pair])]
        for a, b in zip(flat, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=name)
    rows: dict[str, tuple[float, int | None]] = {}
    for name, fn in variants.items():
        seconds = median_seconds(lambda fn=fn: fn(x), size["repeat"])
        rows[name] = (seconds, peak_bytes(lambda fn=fn: fn(x)) if name.startswith("gradserve") else None)
    print("\n| variant | ms | time / without checkpoint | peak MiB (numpy) | peak / without checkpoint |\n|---|---|---|---|---|")
    for name, (seconds, peak) in rows.items():
        base_s, base_peak = rows[name.split(",")[0]]
        peak_text = f"{peak / 2**20:.1f} | {peak / base_peak:.2f}" if peak is not None and base_peak else "— | —"
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base_s:.2f} | {peak_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
