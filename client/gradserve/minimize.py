"""`minimize` and the resumable optimisation loop behind it (the server's batch jobs run the same loop).

    res = gs.minimize(loss, params0, args=(X, y), optimizer=optim.Adam(1e-2), steps=500, batch_size=64)
    res.x, res.fun, res.jac, res.nit, res.nfev, res.status, res.success, res.message, res.history["loss"]
    gs.minimize(loss, params0, bounds=(0.0, None))       # L-BFGS within bounds (L-BFGS-B style)
    gs.minimize(loss, params0, callback=lambda xk: ...)  # after each iteration; True or StopIteration stops

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

import inspect
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
Report = Callable[[Any, float], Any]  # (params after an iteration, the loss there) -> stop?

# result status codes (scipy's style): why the run ended
CONVERGED, REACHED_STEPS, NOT_FINITE = 0, 1, 2
FAILED = 3  # a job that failed with an error (its message says which)
STOPPED = 99  # stopped from outside: by the callback, or a job's cancel


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


def tree_norm(grads: Any) -> float:
    """The L2 norm over all leaves of a pytree of arrays (in float64)."""
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

    `bounds` (lower, upper: pytrees shaped like params, params within them) go to the optimiser's
    update (`supports_bounds`), and the gradient norms are then of the projected gradient
    `params - clip(params - grad, lower, upper)`, zero at a bounded optimum. `callback(params,
    loss)` is called after each of the optimiser's iterations with the loss at those params: at
    once when the iteration evaluated it (L-BFGS's line search), else with the next evaluation
    there (the next step's, or `finish_callbacks` with the final one); True or StopIteration ends
    the run (status STOPPED).
    """

    def __init__(self, value_and_grad: ValueAndGrad, optimizer: optim.Optimizer, state: LoopState, *, args: tuple = (),
                 steps: int, batch_size: int | None = None, seed: int = 0, tol: float | None = None,
                 bounds: optim.Bounds | None = None, callback: Report | None = None):
        if not isinstance(optimizer, optim.Optimizer):
            raise TypeError(f"optimizer must be a gradserve.optim optimizer (or its spec), got {optimizer!r}")
        if bounds is not None and not optimizer.supports_bounds:
            raise ValueError(f"bounds need an optimizer that supports them (optim.LBFGS), got {optimizer.name}")
        self.value_and_grad, self.optimizer, self.state = value_and_grad, optimizer, state
        self.args = tuple(args)
        self.steps = _check_int("steps", steps, 0)
        self.seed = _check_int("seed", seed, 0)
        if tol is not None:
            tol = optim._real("tol", tol, lo=0.0)
        self.tol = tol
        self.batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
        self._batches = None if self.batch_size is None else _Batches(self.args, self.batch_size, self.seed)
        self.bounds, self.callback = bounds, callback
        self.status: int | None = None
        self.success: bool | None = None
        self.message = ""
        self.extra_nfev = 0  # evaluations made by a check that ended the run instead of a step
        self.last_eval: tuple[float, Any] | None = None  # (loss, grads) at state.params on the full args, when known
        self._unreported = False  # an iteration reached state.params whose loss is not known yet (callback)
        self._stop_asked = False

    def batch_args(self, step: int) -> tuple:
        """The args that step `step` evaluates on: the minibatch, or all of args without batch_size."""
        return self.args if self._batches is None else self._batches(step)

    def grad_norm(self, params: Any, grads: Any) -> float:
        """The L2 norm of `grads` over all leaves; with bounds, of the projected gradient."""
        if self.bounds is None:
            return tree_norm(grads)
        named, treedef = flatten(grads, "grads")
        lo, hi = (flatten(b, "bounds")[0] for b in self.bounds)
        ps = flatten(params, "params")[0]
        return tree_norm(unflatten(treedef, [p - np.clip(p - np.asarray(g), a, b) for (_, p), (_, g), (_, a), (_, b)
                                              in zip(ps, named, lo, hi, strict=True)]))

    def stop(self, message: str, status: int = STOPPED) -> None:
        """End the run from outside (a callback, a cancelled job): success False with `message`."""
        self._finish(status, message, False)

    def finish_callbacks(self, params: Any, loss: float) -> None:
        """After the run, the callback for its last iteration, with the loss at `params` (evaluated at the end)."""
        if self._unreported:
            self._unreported = False
            self._report(params, loss)

    def check_final(self, fun: float, grad_norm: float) -> None:
        """After the run, with the loss and gradient norm at its final params: a run that ended well
        where either is not finite ends NOT_FINITE instead."""
        if self.success and not (math.isfinite(fun) and math.isfinite(grad_norm)):
            self.status, self.success = NOT_FINITE, False
            self.message = f"loss is {fun} (gradient norm {grad_norm}) at the final params"

    def _finish(self, status: int, message: str, success: bool) -> None:
        if self.status is None:
            self.status, self.message, self.success = status, message, success

    def _report(self, params: Any, loss: float) -> bool:
        if self.callback is None:
            return False
        try:
            stop = bool(self.callback(params, loss))
        except StopIteration:
            stop = True
        self._stop_asked = self._stop_asked or stop
        return stop

    def _on_iteration(self, params: Any, loss: float | None) -> bool:
        if loss is None:  # reported with the next evaluation at these params
            self._unreported = True
            return False
        return self._report(params, loss)

    def __iter__(self) -> Iterator[StepInfo]:
        st, opt = self.state, self.optimizer
        on_iteration = None if self.callback is None else self._on_iteration
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
            gnorm = self.grad_norm(st.params, grads)
            self.last_eval = (loss, grads) if self._batches is None else None
            if self._unreported:  # the iteration that reached these params, with their loss now known
                self._unreported = False
                if self._report(st.params, loss):
                    self.extra_nfev += 1
                    self.stop(f"stopped by callback after iteration {opt.iterations(st.opt_state)}")
                    return
            if not math.isfinite(loss) or not math.isfinite(gnorm) or (self.tol is not None and gnorm <= self.tol):
                self.extra_nfev += 1
                if not math.isfinite(loss):
                    self._finish(NOT_FINITE, f"loss is {loss} at step {k}", False)
                elif not math.isfinite(gnorm):
                    self._finish(NOT_FINITE, f"gradient is not finite (norm {gnorm}) at step {k}", False)
                else:
                    self._finish(CONVERGED, f"gradient norm {gnorm:.3g} <= tol={self.tol:g} at step {k}", True)
                return
            on_batch = _OnBatch(self.value_and_grad, batch) if opt.needs_value_and_grad else None
            params, opt_state = opt.update(st.params, grads, st.opt_state, loss=loss, value_and_grad=on_batch,
                                           bounds=self.bounds, on_iteration=on_iteration)
            calls = 1 + (on_batch.calls if on_batch is not None else 0)
            self.last_eval = None
            st.params, st.opt_state, st.step, st.nfev = params, opt_state, k + 1, st.nfev + calls
            st.history["loss"].append(loss)
            st.history["grad_norm"].append(gnorm)
            st.history["nfev"].append(calls)
            if self._stop_asked:
                self.stop(f"stopped by callback after iteration {opt.iterations(opt_state)}")
            yield StepInfo(step=k + 1, loss=loss, grad_norm=gnorm, nfev=calls, params=params, stop=opt.stop_reason(opt_state))


# ---------------------------------------------------------------- minimize


def _bounds(bounds: Any, params: Any) -> optim.Bounds:
    """`bounds` as (lower, upper) pytrees of arrays shaped (and typed) like params' leaves.

    `bounds` is a pair (lower, upper) or an object with `lb` and `ub` (scipy.optimize.Bounds);
    each side None (unbounded), a number, or a pytree like params whose leaves are numbers or
    arrays broadcastable to their parameter's shape (-inf/inf: unbounded)."""
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        bounds = (bounds.lb, bounds.ub)
    if isinstance(bounds, (str, bytes, Mapping, np.ndarray)) or not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds must be a pair (lower, upper) or a scipy.optimize.Bounds, got {bounds!r}")
    named, treedef = flatten(params, "params")
    sides = []
    for side, fill, tree in (("lower", -np.inf, bounds[0]), ("upper", np.inf, bounds[1])):
        if tree is None or isinstance(tree, (int, float, np.number)) or (isinstance(tree, np.ndarray) and tree.ndim == 0):
            leaves = [fill if tree is None else tree] * len(named)
        else:
            given, gdef = flatten(tree, f"{side} bounds")
            if gdef != treedef:
                raise ValueError(f"{side} bounds must be None, a number, or a pytree shaped like params")
            leaves = [x for _, x in given]
        out = []
        for (name, p), b in zip(named, leaves, strict=True):
            try:
                a = np.asarray(b, dtype=np.float64)
            except (TypeError, ValueError):
                a = np.full((), np.nan)
            if np.isnan(a).any():
                raise ValueError(f"the {side} bound of {name} must be numbers (-inf/inf for none), got {b!r}")
            try:
                out.append(np.broadcast_to(a, np.shape(p)).astype(np.asarray(p).dtype))
            except ValueError:
                raise ValueError(f"the {side} bound of {name} has shape {a.shape}, which does not broadcast to "
                                 f"its shape {np.shape(p)}") from None
        sides.append(out)
    for (name, _), lo, hi in zip(named, *sides, strict=True):
        if (lo > hi).any():
            raise ValueError(f"a lower bound of {name} is above its upper bound")
    return unflatten(treedef, sides[0]), unflatten(treedef, sides[1])


def _iteration_callback(callback: Callable[..., Any]) -> Report:
    """scipy's two callback signatures: `callback(intermediate_result=OptimizeResult(x=..., fun=...))`
    when its only parameter is named intermediate_result, else `callback(xk)`; each with a copy of params."""
    try:
        names = set(inspect.signature(callback).parameters)
    except (TypeError, ValueError):  # no signature to read (some builtins): scipy's xk form
        names = set()

    def copied(x: Any) -> Any:
        named, treedef = flatten(x, "params")
        return unflatten(treedef, [np.array(v) for _, v in named])

    if names == {"intermediate_result"}:
        return lambda x, fun: callback(intermediate_result=OptimizeResult(x=copied(x), fun=fun))
    return lambda x, fun: callback(copied(x))


def minimize(fun: Callable[..., Any], params0: Any, args: tuple = (), optimizer: optim.Optimizer | Mapping | None = None,
             steps: int = 1000, tol: float | None = None, batch_size: int | None = None, seed: int = 0,
             callback: Callable[..., Any] | None = None, bounds: Any = None) -> OptimizeResult:
    """Minimise scalar `fun(params, *args)` over the pytree `params` with a gradserve optimiser; an OptimizeResult.

    optimizer: an `optim` optimiser or its spec dict; default `optim.LBFGS()` (strong-Wolfe line
        search) without batch_size and `optim.Adam()` (lr=1e-3) with it.
    steps: the most optimiser steps (for L-BFGS a step is up to `max_iter_per_step` iterations).
    tol: stop, successfully, once the gradient's L2 norm at the start of a step is <= tol.
        L-BFGS also stops on its own tolerance_grad / tolerance_change tests.
    batch_size: slice every array of `args` (ndim >= 1; pytrees allowed) along axis 0 into
        minibatches of exactly this size, shuffled per epoch by `seed` (see `batch_indices`);
        arrays that must stay whole belong in fun's closure, not in args.
    callback: called after each optimiser iteration, as scipy's: `callback(xk)` with a copy of the
        params, or `callback(intermediate_result=OptimizeResult(x=..., fun=...))` when that is its
        only parameter's name (fun: the loss at x, on the minibatch that evaluated it); returning
        True or raising StopIteration stops the run (status 99).
    bounds: `(lower, upper)` or a `scipy.optimize.Bounds`, each side None, a number or a pytree
        like params (-inf/inf where unbounded); L-BFGS only (projected, in the manner of
        L-BFGS-B). params0 is clipped into them, and every point evaluated lies within them.

    The result (dict-like, as scipy's): x (the params, numpy arrays), fun and jac (loss and gradient
    at x on all of args), grad_norm (of jac; projected onto the bounds with bounds), nit (the
    optimiser's iterations, `optimizer.iterations`: L-BFGS's own count), nfev and njev (evaluations
    of fun, each of value and gradient together, so equal), nstep (optimiser steps), status,
    success, message, history ({"loss", "grad_norm", "nfev"}: one entry per step, the loss and
    gradient norm at the params the step started from, on its minibatch), optimizer (its spec) and
    opt_state.
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

    params = _float_params(params0)
    box = None
    if bounds is not None:
        box = _bounds(bounds, params)
        named, treedef = flatten(params, "params")
        lo, hi = (flatten(b, "bounds")[0] for b in box)
        params = unflatten(treedef, [np.clip(p, a, b) for (_, p), (_, a), (_, b) in zip(named, lo, hi, strict=True)])
    state = LoopState.start(params, optimizer)
    loop = OptimizationLoop(loss_and_grad, optimizer, state, args=args, steps=steps, batch_size=batch_size, seed=seed,
                            tol=tol, bounds=box, callback=None if callback is None else _iteration_callback(callback))
    for _ in loop:
        pass
    nfev = state.nfev + loop.extra_nfev
    if loop.last_eval is not None:
        fun_x, jac = loop.last_eval
    else:
        fun_x, jac = loss_and_grad(state.params, args)
        fun_x = float(fun_x)
        nfev += 1
    loop.finish_callbacks(state.params, fun_x)
    grad_norm = loop.grad_norm(state.params, jac)
    loop.check_final(fun_x, grad_norm)
    return OptimizeResult(x=state.params, fun=fun_x, jac=jac, grad_norm=grad_norm, nit=optimizer.iterations(state.opt_state),
                          nfev=nfev, njev=nfev, nstep=state.step, status=loop.status, success=loop.success,
                          message=loop.message,
                          history={k: list(v) for k, v in state.history.items()}, optimizer=optimizer.spec(),
                          opt_state=state.opt_state)
