"""`minimize` and the resumable optimisation loop behind it (the server's batch jobs run the same loop).

    res = gs.minimize(loss, params0, args=(X, y), optimizer=optim.Adam(1e-2), steps=500, batch_size=64)
    res.x, res.fun, res.nit, res.success, res.message, res.history["loss"]

The loop, for a server that checkpoints and resumes:

    state = LoopState.start(params0, opt)                  # or LoopState.from_arrays(saved, opt, params0)
    loop = OptimizationLoop(value_and_grad, opt, state, args=args, steps=1000, batch_size=64, seed=0)
    for info in loop:                                      # one StepInfo after each step
        save(state.to_arrays(opt))                         # params, optimiser state, step, nfev, history
    loop.status, loop.success, loop.message

`value_and_grad(params, batch_args) -> (loss, grads)` is the only way the loop touches the function:
L-BFGS's line search calls it too, on the step's minibatch. Minibatches are a pure function of
`(seed, step)` (see `batch_indices`), so the random state of a run is its step counter: resuming
from a checkpoint taken after step k gives bit-identical results to the uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import optim
from .api import flatten, unflatten
from .local import value_and_grad

__all__ = ["LoopState", "OptimizationLoop", "OptimizeResult", "StepInfo", "batch_indices", "epoch_permutation",
           "minimize"]

ValueAndGrad = Callable[[Any, tuple], tuple[Any, Any]]

# result status codes (scipy's style): why the run ended
CONVERGED, REACHED_STEPS, NOT_FINITE, STOPPED_BY_CALLBACK = 0, 1, 2, 99


class OptimizeResult(dict):
    """scipy-style result: a dict with attribute access (`res.x`, `res["x"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __dir__(self) -> list[str]:
        return list(self.keys())

    def __repr__(self) -> str:
        if not self:
            return f"{type(self).__name__}()"
        width = max(map(len, self)) + 1
        lines = []
        for k, v in self.items():
            if k == "history":
                v = {h: f"[{len(vals)} values]" for h, vals in v.items()}
            elif k == "opt_state" and isinstance(v, dict):
                v = {s: (f"<{x.dtype}{list(x.shape)}>" if isinstance(x, np.ndarray) else x if isinstance(x, (int, float))
                         else "<pytree>") for s, x in v.items()}
            lines.append(f"{k.rjust(width)}: {v!r}".replace("\n", "\n" + " " * (width + 2)))
        return "\n".join(lines)


# ---------------------------------------------------------------- minibatches


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n examples in epoch `epoch`: `np.random.default_rng((seed, epoch)).permutation(n)`."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The example indices of minibatch `step`: positions [step*b, (step+1)*b) of the epochs' permutations laid end to end.

    Every batch has exactly `batch_size` examples (one compiled plan for the whole run) and every
    epoch visits each example exactly once; when n is not a multiple of the batch size, the batch
    that straddles an epoch boundary ends with the first examples of the next epoch's order (so it
    may hold one example twice). Nothing is dropped and no batch is short.
    """
    return _indices(n, batch_size, step, lambda e: epoch_permutation(n, seed, e))


def _indices(n: int, b: int, step: int, perm: Callable[[int], np.ndarray]) -> np.ndarray:
    start, stop = step * b, (step + 1) * b
    parts = [perm(e)[max(start - e * n, 0):min(stop - e * n, n)] for e in range(start // n, (stop - 1) // n + 1)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Batches:
    """Slices every array leaf (ndim >= 1) of `args` along axis 0 to the minibatch of a step."""

    def __init__(self, args: tuple, batch_size: int, seed: int):
        named, self.treedef = flatten(list(args), "args")
        self.leaves = [x for _, x in named]
        self.sliced = [i for i, x in enumerate(self.leaves) if isinstance(x, np.ndarray) and x.ndim >= 1]
        if not self.sliced:
            raise ValueError("batch_size needs at least one numpy array in args to slice along axis 0")
        lengths = {named[i][0]: self.leaves[i].shape[0] for i in self.sliced}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"batch_size needs every array in args to have the same length along axis 0, got {lengths}")
        self.n = next(iter(lengths.values()))
        if batch_size > self.n:
            raise ValueError(f"batch_size={batch_size} is larger than the {self.n} examples in args")
        self.batch_size, self.seed = batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            perm = self._perms[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return perm

    def indices(self, step: int) -> np.ndarray:
        return _indices(self.n, self.batch_size, step, self._perm)

    def __call__(self, step: int) -> tuple:
        idx = self.indices(step)
        leaves = list(self.leaves)
        for i in self.sliced:
            leaves[i] = np.take(leaves[i], idx, axis=0)
        return tuple(unflatten(self.treedef, leaves))


# ---------------------------------------------------------------- the loop's state


def _params_leaves(params: Any) -> tuple[list[tuple[str, np.ndarray]], Any]:
    named, treedef = flatten(params, "params")
    if not named:
        raise ValueError("params has no arrays to optimise")
    out = []
    for name, x in named:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (np.ndarray, np.number, int, float)):
            raise TypeError(f"{name} must be a float array or number to be optimised, got {type(x).__name__}")
        a = np.asarray(x)
        if a.dtype.kind == "b" or a.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a float array or number to be optimised, got dtype {a.dtype}")
        out.append((name, a))
    return out, treedef


def _float_params(params: Any) -> Any:
    """A copy of `params` whose leaves are numpy arrays (Python numbers and integer arrays as float64)."""
    named, treedef = _params_leaves(params)
    return unflatten(treedef, [np.array(a, dtype=a.dtype if a.dtype.kind == "f" else np.float64) for _, a in named])


def _new_history() -> dict[str, list]:
    return {"loss": [], "grad_norm": [], "nfev": []}


@dataclass
class LoopState:
    """What a checkpoint holds: params, optimiser state, steps done, evaluations done and the history so far."""

    params: Any
    opt_state: dict[str, Any]
    step: int = 0
    nfev: int = 0
    history: dict[str, list] = field(default_factory=_new_history)

    @classmethod
    def start(cls, params0: Any, optimizer: optim.Optimizer) -> LoopState:
        """The state before the first step (params copied; numbers and integer arrays become float64 arrays)."""
        params = _float_params(params0)
        return cls(params=params, opt_state=optimizer.init(params))

    def to_arrays(self, optimizer: optim.Optimizer) -> dict[str, np.ndarray]:
        """A flat dict of numpy arrays (copies) to store: `params.*`, `opt.*`, `step`, `nfev`, `history.*`."""
        out = {name: np.array(x) for name, x in flatten(self.params, "params")[0]}
        out.update({f"opt.{k}": v for k, v in optimizer.state_to_arrays(self.opt_state).items()})
        out["step"], out["nfev"] = np.array(self.step), np.array(self.nfev)
        out["history.loss"] = np.array(self.history["loss"], np.float64)
        out["history.grad_norm"] = np.array(self.history["grad_norm"], np.float64)
        out["history.nfev"] = np.array(self.history["nfev"], np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], optimizer: optim.Optimizer, params_like: Any) -> LoopState:
        """The state `to_arrays` gave, for params shaped like `params_like` (e.g. the job's params0)."""
        named, treedef = _params_leaves(_float_params(params_like))
        expected = {name for name, _ in named} | {"step", "nfev", "history.loss", "history.grad_norm", "history.nfev"}
        leaves = []
        for name, like in named:
            if name not in arrays:
                raise ValueError(f"checkpoint has no {name!r}")
            a = np.asarray(arrays[name])
            if a.dtype != like.dtype or a.shape != like.shape:
                raise ValueError(f"checkpoint {name!r} is {a.dtype}{list(a.shape)}, expected {like.dtype}{list(like.shape)}")
            leaves.append(np.array(a))
        params = unflatten(treedef, leaves)
        opt_arrays = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
        unknown = sorted(k for k in arrays if k not in expected and not k.startswith("opt."))
        if unknown:
            raise ValueError(f"unexpected checkpoint entries: {unknown}")
        missing = sorted(k for k in expected if k not in arrays)
        if missing:
            raise ValueError(f"checkpoint has no {missing}")
        step, nfev = int(np.asarray(arrays["step"])), int(np.asarray(arrays["nfev"]))
        history: dict[str, list[Any]] = {"loss": [float(v) for v in np.asarray(arrays["history.loss"])],
                   "grad_norm": [float(v) for v in np.asarray(arrays["history.grad_norm"])],
                   "nfev": [int(v) for v in np.asarray(arrays["history.nfev"])]}
        if any(len(v) != step for v in history.values()):
            raise ValueError(f"checkpoint history lengths {[len(v) for v in history.values()]} do not match step={step}")
        return cls(params=params, opt_state=optimizer.state_from_arrays(opt_arrays, params), step=step, nfev=nfev,
                   history=history)


@dataclass(frozen=True)
class StepInfo:
    """Progress after one step: steps done, the loss and gradient norm the step started from, its evaluations."""

    step: int  # steps completed, 1 after the first
    loss: float  # the loss at the params the step started from (on its minibatch)
    grad_norm: float  # the L2 norm of the gradient there, over all leaves
    nfev: int  # value_and_grad calls the step made (1, or more for L-BFGS)
    params: Any  # the params after the step
    stop: str | None  # the optimiser's convergence message when it has converged (the loop then ends)


def _grad_norm(grads: Any) -> float:
    total = 0.0
    for _, g in flatten(grads, "grads")[0]:
        a = np.asarray(g)
        total += float(np.vdot(a, a).real) if a.dtype == np.float64 else float(np.sum(np.square(a, dtype=np.float64)))
    return math.sqrt(total)


class _OnBatch:
    """`value_and_grad` bound to one step's batch, counting its calls (L-BFGS's line search)."""

    def __init__(self, value_and_grad: ValueAndGrad, batch: tuple):
        self.value_and_grad, self.batch, self.calls = value_and_grad, batch, 0

    def __call__(self, params: Any) -> tuple[Any, Any]:
        self.calls += 1
        return self.value_and_grad(params, self.batch)


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


class OptimizationLoop:
    """The steps of a run, resumable: iterate for a StepInfo after each; `state` is checkpointable at every one.

    Each step: take the step's minibatch, evaluate `value_and_grad(params, batch)`, stop if the loss
    or the gradient is not finite or the gradient norm is <= tol, else update (L-BFGS evaluates more
    on the same batch) and record loss, grad_norm and nfev in `state.history`. The run ends after
    `steps` steps in all (counting those of the checkpoint it resumed from) or when the optimiser
    reports convergence; then `status`, `success` and `message` say why.
    """

    def __init__(self, value_and_grad: ValueAndGrad, optimizer: optim.Optimizer, state: LoopState, *, args: tuple = (),
                 steps: int, batch_size: int | None = None, seed: int = 0, tol: float | None = None):
        if not isinstance(optimizer, optim.Optimizer):
            raise TypeError(f"optimizer must be a gradserve.optim optimizer (or its spec), got {optimizer!r}")
        self.value_and_grad, self.optimizer, self.state = value_and_grad, optimizer, state
        self.args = tuple(args)
        self.steps = _check_int("steps", steps, 0)
        self.seed = _check_int("seed", seed, 0)
        if tol is not None:
            tol = optim._real("tol", tol, lo=0.0)
        self.tol = tol
        self.batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
        self._batches = None if self.batch_size is None else _Batches(self.args, self.batch_size, self.seed)
        self.status: int | None = None
        self.success: bool | None = None
        self.message = ""
        self.extra_nfev = 0  # evaluations made by a check that ended the run instead of a step
        self.last_eval: tuple[float, Any] | None = None  # (loss, grads) at state.params on the full args, when known

    def batch_args(self, step: int) -> tuple:
        """The args that step `step` evaluates on: the minibatch, or all of args without batch_size."""
        return self.args if self._batches is None else self._batches(step)

    def stop(self, message: str, status: int = STOPPED_BY_CALLBACK) -> None:
        """End the run from outside (a callback, a cancelled job): success False with `message`."""
        self._finish(status, message, False)

    def _finish(self, status: int, message: str, success: bool) -> None:
        if self.status is None:
            self.status, self.message, self.success = status, message, success

    def __iter__(self) -> Iterator[StepInfo]:
        st, opt = self.state, self.optimizer
        while self.status is None:
            reason = opt.stop_reason(st.opt_state)
            if reason is not None:  # converged on the last step (or before the checkpoint this run resumed from)
                self._finish(CONVERGED, reason, True)
                return
            if st.step >= self.steps:
                if self.tol is None and not opt.has_convergence_test:
                    self._finish(REACHED_STEPS, f"reached steps={self.steps}", True)
                else:
                    test = f"the gradient norm fell to tol={self.tol:g}" if self.tol is not None else f"{opt.name} converged"
                    self._finish(REACHED_STEPS, f"reached steps={self.steps} before {test}", False)
                return
            k = st.step
            batch = self.batch_args(k)
            loss, grads = self.value_and_grad(st.params, batch)
            loss = float(loss)
            gnorm = _grad_norm(grads)
            self.last_eval = (loss, grads) if self._batches is None else None
            if not math.isfinite(loss) or not math.isfinite(gnorm) or (self.tol is not None and gnorm <= self.tol):
                self.extra_nfev += 1
                if not math.isfinite(loss):
                    self._finish(NOT_FINITE, f"loss is {loss} at step {k}", False)
                elif not math.isfinite(gnorm):
                    self._finish(NOT_FINITE, f"gradient is not finite (norm {gnorm}) at step {k}", False)
                else:
                    self._finish(CONVERGED, f"gradient norm {gnorm:.3g} <= tol={self.tol:g} at step {k}", True)
                return
            calls = 1
            if opt.needs_value_and_grad:
                on_batch = _OnBatch(self.value_and_grad, batch)
                params, opt_state = opt.update(st.params, grads, st.opt_state, loss=loss, value_and_grad=on_batch)
                calls += on_batch.calls
            else:
                params, opt_state = opt.update(st.params, grads, st.opt_state, loss=loss)
            self.last_eval = None
            st.params, st.opt_state, st.step, st.nfev = params, opt_state, k + 1, st.nfev + calls
            st.history["loss"].append(loss)
            st.history["grad_norm"].append(gnorm)
            st.history["nfev"].append(calls)
            yield StepInfo(step=k + 1, loss=loss, grad_norm=gnorm, nfev=calls, params=params, stop=opt.stop_reason(opt_state))


# ---------------------------------------------------------------- minimize


def minimize(fun: Callable[..., Any], params0: Any, args: tuple = (), optimizer: optim.Optimizer | Mapping | None = None,
             steps: int = 1000, tol: float | None = None, batch_size: int | None = None, seed: int = 0,
             callback: Callable[[StepInfo], Any] | None = None) -> OptimizeResult:
    """Minimise scalar `fun(params, *args)` over the pytree `params` with a gradserve optimiser; an OptimizeResult.

    optimizer: an `optim` optimiser or its spec dict; default `optim.LBFGS()` (strong-Wolfe line
        search) without batch_size and `optim.Adam()` (lr=1e-3) with it.
    steps: the most optimiser steps (for L-BFGS a step is up to `max_iter_per_step` iterations).
    tol: stop, successfully, once the gradient's L2 norm at the start of a step is <= tol.
        L-BFGS also stops on its own tolerance_grad / tolerance_change tests.
    batch_size: slice every array of `args` (ndim >= 1; pytrees allowed) along axis 0 into
        minibatches of exactly this size, shuffled per epoch by `seed` (see `batch_indices`);
        arrays that must stay whole belong in fun's closure, not in args.
    callback: `callback(StepInfo)` after each step; returning True or raising StopIteration stops.

    The result (dict-like, as scipy's): x (the params, numpy arrays), fun and jac (loss and gradient
    at x on all of args), grad_norm, nit (steps taken), nfev, status, success, message, history
    ({"loss", "grad_norm", "nfev"}: one entry per step, the loss and gradient norm at the params the
    step started from, on its minibatch), optimizer (its spec) and opt_state.
    status and success: 0/True converged (tol or the optimiser's own tests); 1 reached steps, True
    when no convergence test was asked for (tol None and a first-order optimiser), False otherwise
    (scipy's maxiter); 2/False a non-finite loss or gradient (x is where it was evaluated);
    99/False stopped by the callback.
    """
    if optimizer is None:
        optimizer = optim.LBFGS() if batch_size is None else optim.Adam()
    elif isinstance(optimizer, Mapping):
        optimizer = optim.from_spec(optimizer)
    elif not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer must be a gradserve.optim optimizer or its spec dict, got {optimizer!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}")
    if not isinstance(args, tuple):
        args = (args,)
    vg_fun = value_and_grad(fun)

    def loss_and_grad(params: Any, batch_args: tuple) -> tuple[Any, Any]:
        return vg_fun(params, *batch_args)

    state = LoopState.start(params0, optimizer)
    loop = OptimizationLoop(loss_and_grad, optimizer, state, args=args, steps=steps, batch_size=batch_size, seed=seed,
                            tol=tol)
    for info in loop:
        if callback is None:
            continue
        try:
            stop = callback(info)
        except StopIteration:
            stop = True
        if stop:
            loop.stop(f"stopped by callback after step {info.step}")
            break
    nfev = state.nfev + loop.extra_nfev
    if loop.last_eval is not None:
        fun_x, jac = loop.last_eval
    else:
        fun_x, jac = loss_and_grad(state.params, args)
        fun_x = float(fun_x)
        nfev += 1
    grad_norm = _grad_norm(jac)
    status, success, message = loop.status, loop.success, loop.message
    if success and not (math.isfinite(fun_x) and math.isfinite(grad_norm)):
        status, success, message = NOT_FINITE, False, f"loss is {fun_x} (gradient norm {grad_norm}) at the final params"
    return OptimizeResult(x=state.params, fun=fun_x, jac=jac, grad_norm=grad_norm, nit=state.step, nfev=nfev,
                          status=status, success=success, message=message,
                          history={k: list(v) for k, v in state.history.items()}, optimizer=optimizer.spec(),
                          opt_state=state.opt_state)
