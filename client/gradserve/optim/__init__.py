"""Optimisers in plain numpy, functional and checkpointable: SGD, Adam, AdamW, LBFGS.

    from gradserve import optim
    opt = optim.Adam(lr=1e-2, schedule=optim.schedules.CosineAnnealingLR(T_max=1000))
    state = opt.init(params)                           # a dict of numpy arrays and Python numbers
    params, state = opt.update(params, grads, state)   # new params and a new state; nothing is mutated
    opt.iterations(state)                              # the optimiser's own iteration count
    opt.spec()                                         # {"name": "Adam", "lr": 0.01, ...}: JSON-ready
    optim.from_spec(opt.spec()) == opt                 # ValueError naming any bad field
    saved = opt.state_dict(state)                      # {"optimizer": spec, "state": {name: array}} (torch's)
    state = opt.load_state_dict(saved, params)         # the same state back, bit for bit
    arrays = opt.state_to_arrays(state)                # {"step": array(3), "exp_avg.params.w": ...}
    opt.state_from_arrays(arrays, params)              # the same state back, bit for bit

`params` and `grads` are pytrees (nested dicts/lists/tuples) of numpy arrays with the same
structure; every array in the state has its parameter's dtype. The update formulas are
torch.optim's single-tensor code paths, operation for operation (same parameter trajectories in
float64 to rounding), and a `schedule` (`optim.schedules`) sets the lr of each update as
torch.optim.lr_scheduler would, stepped once per update. `LBFGS` is torch.optim.LBFGS: one
`update` is one `torch` `step(closure)`, i.e. up to `max_iter_per_step` iterations, each with a
strong-Wolfe line search that calls `value_and_grad(params) -> (loss, grads)`; `minimize` passes
the same callable (on the same minibatch) that it used for the step's first evaluation. With
`bounds=(lower, upper)` LBFGS is a projected L-BFGS in the manner of L-BFGS-B: variables held at
a bound by their gradient stay out of the quasi-Newton direction and a backtracking (Armijo)
line search runs along the projected path, so every point it evaluates lies within the bounds.

`update(..., on_iteration=f)` calls `f(params, loss)` after each of the optimiser's iterations,
with the loss at those params, or None where the iteration did not evaluate it (a first-order
step; L-BFGS without a line search at the end of a step); `f` returning True ends the update
after that iteration.

State layout (the contract a checkpoint relies on): `state` is a flat dict from a field name to
either a Python int/float or a pytree of numpy arrays shaped like `params` (first-order
optimisers) or a flat numpy array (LBFGS). `state_to_arrays` names every leaf by its path
(`exp_avg.params.w`, `momentum_buffer.params[0]`); `state_from_arrays` rebuilds the structure from
`init(params)` and checks names, dtypes and shapes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from ..api import flatten, unflatten
from . import schedules
from ._checks import flag as _flag
from ._checks import integer as _integer
from ._checks import named as _named
from ._checks import real as _real
from .schedules import Schedule

__all__ = ["LBFGS", "SGD", "Adam", "AdamW", "Optimizer", "from_spec", "schedules"]

ValueAndGrad = Callable[[Any], tuple[Any, Any]]
OnIteration = Callable[[Any, "float | None"], Any]  # (params after an iteration, the loss there or None) -> stop?
Bounds = tuple[Any, Any]  # (lower, upper): pytrees shaped like params, -inf/inf where unbounded

# ---------------------------------------------------------------- pytrees of arrays


def _leaves(tree: Any, what: str = "params") -> tuple[list[np.ndarray], Any]:
    named, treedef = flatten(tree, what)
    return [np.asarray(x) for _, x in named], treedef


def _matching(params: Any, grads: Any) -> tuple[list[np.ndarray], list[np.ndarray], Any]:
    p, pdef = _leaves(params)
    g, gdef = _leaves(grads, "grads")
    if pdef != gdef:
        raise ValueError("grads must have the structure of params")
    for x, y in zip(p, g, strict=True):
        if x.shape != y.shape:
            raise ValueError(f"a gradient of shape {y.shape} does not match its parameter's shape {x.shape}")
    return p, g, pdef


def _zeros_like(params: Any) -> Any:
    leaves, treedef = _leaves(params)
    return unflatten(treedef, [np.zeros_like(x) for x in leaves])


def _schedule(schedule: Any) -> Schedule | None:
    if schedule is not None and not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be an optim.schedules schedule or None, got {schedule!r}")
    return schedule


# ---------------------------------------------------------------- the base class


class Optimizer:
    """An optimiser: immutable hyper-parameters, a functional `init`/`update` over a numpy state."""

    name: ClassVar[str] = "Optimizer"
    fields: ClassVar[tuple[str, ...]] = ()
    needs_value_and_grad: ClassVar[bool] = False  # True: update() evaluates the function itself
    has_convergence_test: ClassVar[bool] = False  # True: stop_reason() can end a run by itself
    supports_bounds: ClassVar[bool] = False  # True: update() takes bounds=(lower, upper)
    _ragged: ClassVar[frozenset[str]] = frozenset()  # state fields whose leading dimension varies
    schedule: Schedule | None = None
    lr: float

    def __setattr__(self, key: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{self.name}'s hyper-parameters are read-only; build a new optimizer")
        object.__setattr__(self, key, value)

    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def spec(self) -> dict[str, Any]:
        """The JSON-ready description `{"name": ..., hyper-parameter: value, ...}` that from_spec rebuilds."""
        out: dict[str, Any] = {"name": self.name}
        for f in self.fields:
            v = getattr(self, f)
            if isinstance(v, Schedule):
                v = v.to_json()
            elif v is None and f == "schedule":  # no schedule: the spec of before schedules existed
                continue
            out[f] = list(v) if isinstance(v, tuple) else v
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Optimizer) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{f}={getattr(self, f)!r}' for f in self.fields)})"

    def init(self, params: Any) -> dict[str, Any]:
        """The state before the first step, for `params` (a pytree of float arrays)."""
        raise NotImplementedError

    def update(self, params: Any, grads: Any, state: dict[str, Any], *, loss: Any = None,
               value_and_grad: ValueAndGrad | None = None, bounds: Bounds | None = None,
               on_iteration: OnIteration | None = None) -> tuple[Any, dict[str, Any]]:
        """One step: `(new params, new state)` from the gradient `grads` of the loss at `params`."""
        raise NotImplementedError

    def stop_reason(self, state: dict[str, Any]) -> str | None:
        """Why the optimiser considers itself converged after the step that gave `state`, or None."""
        return None

    def iterations(self, state: Mapping[str, Any]) -> int:
        """The iterations the optimiser has made to reach `state` (scipy's `nit`): one per update for
        first-order optimisers."""
        return int(state["step"])

    def _lr(self, step: int) -> float:
        """The learning rate of the update that follows `step` updates."""
        return self.lr if self.schedule is None else self.schedule.lr(self.lr, step)

    def _first_order_step(self, bounds: Bounds | None) -> None:
        if bounds is not None:
            raise ValueError(f"{self.name} takes no bounds; optim.LBFGS does (a projected L-BFGS-B)")

    # ---- torch's state_dict
    def state_dict(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """torch's `state_dict()` for this functional optimiser: `{"optimizer": spec(), "state":
        state_to_arrays(state)}` (copies; JSON and `np.savez(**sd["state"])` hold it)."""
        return {"optimizer": self.spec(), "state": self.state_to_arrays(state)}

    def load_state_dict(self, state_dict: Mapping[str, Any], params: Any) -> dict[str, Any]:
        """The state `state_dict` saved, for `params`; ValueError when it is another optimiser's or
        does not fit params. The hyper-parameters stay this optimiser's (they are immutable: unlike
        torch's, loading does not replace them; `from_spec(state_dict["optimizer"])` rebuilds the saved one)."""
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"optimizer", "state"}:
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"a state dict has exactly the keys 'optimizer' and 'state', got {got}")
        saved, arrays = state_dict["optimizer"], state_dict["state"]
        name = saved.get("name") if isinstance(saved, Mapping) else None
        if name != self.name:
            raise ValueError(f"the state dict is {name!r}'s; it cannot be loaded into {self.name}")
        if not isinstance(arrays, Mapping):
            raise ValueError(f"a state dict's 'state' maps names to arrays, got {type(arrays).__name__}")
        return self.state_from_arrays(arrays, params)

    # ---- checkpoints
    def state_to_arrays(self, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every leaf of `state` as a numpy array (Python numbers as 0-d arrays), keyed by its path."""
        out: dict[str, np.ndarray] = {}
        for key, value in state.items():
            for name, leaf in flatten(value, key)[0]:
                if name in out:
                    raise ValueError(f"two state leaves are both named {name!r}; rename the parameters")
                out[name] = np.array(leaf)
        return out

    def state_from_arrays(self, arrays: Mapping[str, Any], params: Any) -> dict[str, Any]:
        """The state that `state_to_arrays` gave, rebuilt for `params`; ValueError on any mismatch."""
        template = self.init(params)
        state: dict[str, Any] = {}
        seen: set[str] = set()
        for key, value in template.items():
            named, treedef = flatten(value, key)
            leaves = []
            for name, leaf in named:
                if name not in arrays:
                    raise ValueError(f"{self.name} state has no {name!r}")
                seen.add(name)
                leaves.append(self._restore(key, name, leaf, np.asarray(arrays[name])))
            state[key] = unflatten(treedef, leaves)
        extra = sorted(set(arrays) - seen)
        if extra:
            raise ValueError(f"unexpected {self.name} state entries: {extra}")
        return state

    def _restore(self, key: str, name: str, like: Any, a: np.ndarray) -> Any:
        if isinstance(like, (int, float)):
            ok = a.ndim == 0 and (a.dtype.kind in "iu" if isinstance(like, int) else a.dtype.kind == "f")
            if not ok:
                raise ValueError(f"{self.name} state {name!r} must be a {type(like).__name__} scalar, got {a.dtype}{a.shape}")
            return int(a) if isinstance(like, int) else float(a)
        like = np.asarray(like)
        shape_ok = a.shape[1:] == like.shape[1:] and a.ndim == like.ndim if key in self._ragged else a.shape == like.shape
        if a.dtype != like.dtype or not shape_ok:
            raise ValueError(f"{self.name} state {name!r} must be {like.dtype}{list(like.shape)}, got {a.dtype}{list(a.shape)}")
        return np.array(a)


# ---------------------------------------------------------------- SGD


class SGD(Optimizer):
    """torch.optim.SGD: p -= lr * g', g' = g + wd p, with (optionally Nesterov) momentum and dampening."""

    name = "SGD"
    fields = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "schedule")

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 dampening: float = 0.0, schedule: Schedule | None = None):
        self.lr = _real("lr", lr, lo=0.0)
        self.schedule = _schedule(schedule)
        self.momentum = _real("momentum", momentum, lo=0.0)
        self.dampening = _real("dampening", dampening, lo=0.0, hi=1.0)
        self.weight_decay = _real("weight_decay", weight_decay, lo=0.0)
        self.nesterov = _flag("nesterov", nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        self._freeze()

    def init(self, params: Any) -> dict[str, Any]:
        """`{"step": 0}` plus a zero `momentum_buffer` shaped like params when momentum != 0."""
        state: dict[str, Any] = {"step": 0}
        if self.momentum != 0:
            state["momentum_buffer"] = _zeros_like(params)
        return state

    def update(self, params: Any, grads: Any, state: dict[str, Any], *, loss: Any = None,
               value_and_grad: ValueAndGrad | None = None, bounds: Bounds | None = None,
               on_iteration: OnIteration | None = None) -> tuple[Any, dict[str, Any]]:
        """One SGD step (torch's `_single_tensor_sgd`)."""
        self._first_order_step(bounds)
        ps, gs_, treedef = _matching(params, grads)
        lr, mom, damp, wd = self._lr(state["step"]), self.momentum, self.dampening, self.weight_decay
        bufs = _leaves(state["momentum_buffer"], "momentum_buffer")[0] if mom != 0 else None
        first = state["step"] == 0
        new_p, new_b = [], []
        for i, (p, g) in enumerate(zip(ps, gs_, strict=True)):
            if wd != 0:
                g = g + wd * p
            if bufs is not None:
                buf = g.copy() if first else bufs[i] * mom + (1 - damp) * g
                new_b.append(np.asarray(buf))
                g = g + mom * buf if self.nesterov else buf
            new_p.append(np.asarray(p + (-lr) * g))
        new_state: dict[str, Any] = {"step": state["step"] + 1}
        if bufs is not None:
            new_state["momentum_buffer"] = unflatten(treedef, new_b)
        new_params = unflatten(treedef, new_p)
        if on_iteration is not None:
            on_iteration(new_params, None)
        return new_params, new_state


# ---------------------------------------------------------------- Adam, AdamW


def _lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    # torch's lerp: the formula depends on the weight's size (ATen/native/Lerp.h)
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient; optional AMSGrad)."""

    name = "Adam"
    fields = ("lr", "betas", "eps", "weight_decay", "amsgrad", "schedule")
    _decoupled: ClassVar[bool] = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, schedule: Schedule | None = None):
        self.lr = _real("lr", lr, lo=0.0)
        self.schedule = _schedule(schedule)
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_real("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True),
                      _real("betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True))
        self.eps = _real("eps", eps, lo=0.0)
        self.weight_decay = _real("weight_decay", weight_decay, lo=0.0)
        self.amsgrad = _flag("amsgrad", amsgrad)
        self._freeze()

    def init(self, params: Any) -> dict[str, Any]:
        """`{"step": 0, "exp_avg": 0, "exp_avg_sq": 0}` (+ `max_exp_avg_sq` with amsgrad), arrays like params."""
        state: dict[str, Any] = {"step": 0, "exp_avg": _zeros_like(params), "exp_avg_sq": _zeros_like(params)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = _zeros_like(params)
        return state

    def update(self, params: Any, grads: Any, state: dict[str, Any], *, loss: Any = None,
               value_and_grad: ValueAndGrad | None = None, bounds: Bounds | None = None,
               on_iteration: OnIteration | None = None) -> tuple[Any, dict[str, Any]]:
        """One Adam/AdamW step (torch's `_single_tensor_adam`)."""
        self._first_order_step(bounds)
        ps, gs_, treedef = _matching(params, grads)
        lr, (beta1, beta2), eps, wd = self._lr(state["step"]), self.betas, self.eps, self.weight_decay
        ms = _leaves(state["exp_avg"], "exp_avg")[0]
        vs = _leaves(state["exp_avg_sq"], "exp_avg_sq")[0]
        vmaxs = _leaves(state["max_exp_avg_sq"], "max_exp_avg_sq")[0] if self.amsgrad else None
        step = state["step"] + 1
        bias_correction1 = 1 - beta1 ** float(step)
        bias_correction2 = 1 - beta2 ** float(step)
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        new_p, new_m, new_v, new_vmax = [], [], [], []
        for i, (p, g) in enumerate(zip(ps, gs_, strict=True)):
            if wd != 0:
                if self._decoupled:
                    p = p * (1 - lr * wd)
                else:
                    g = g + wd * p
            m = _lerp(ms[i], g, 1 - beta1)
            v = vs[i] * beta2 + (1 - beta2) * g * g
            if vmaxs is not None:
                vmax = np.maximum(vmaxs[i], v)
                new_vmax.append(np.asarray(vmax))
                denom = np.sqrt(vmax) / bias_correction2_sqrt + eps
            else:
                denom = np.sqrt(v) / bias_correction2_sqrt + eps
            new_p.append(np.asarray(p + (-step_size) * m / denom))
            new_m.append(np.asarray(m))
            new_v.append(np.asarray(v))
        new_state: dict[str, Any] = {"step": step, "exp_avg": unflatten(treedef, new_m),
                                     "exp_avg_sq": unflatten(treedef, new_v)}
        if vmaxs is not None:
            new_state["max_exp_avg_sq"] = unflatten(treedef, new_vmax)
        new_params = unflatten(treedef, new_p)
        if on_iteration is not None:
            on_iteration(new_params, None)
        return new_params, new_state


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (p *= 1 - lr * weight_decay before the step)."""

    name = "AdamW"
    _decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, schedule: Schedule | None = None):
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, schedule=schedule)


# ---------------------------------------------------------------- L-BFGS

# why an L-BFGS step ended, kept in state["stop"]; 0: its iteration or evaluation budget (go on)
STOP_GRAD, STOP_DIRECTION, STOP_STEP, STOP_LOSS = 1, 2, 3, 4
_STOP_MESSAGES = {
    STOP_GRAD: "L-BFGS converged: max |gradient| <= tolerance_grad",
    STOP_DIRECTION: "L-BFGS converged: directional derivative > -tolerance_change",
    STOP_STEP: "L-BFGS converged: parameter change <= tolerance_change",
    STOP_LOSS: "L-BFGS converged: loss change < tolerance_change",
}


def _cubic_interpolate(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                       bounds: tuple[float, float] | None = None) -> float:
    """The minimiser of the cubic through two points with values and slopes, clipped to bounds."""
    # torch.optim.lbfgs._cubic_interpolate, in float64 with IEEE division (no ZeroDivisionError)
    x1, f1, g1, x2, f2, g2 = (np.float64(v) for v in (x1, f1, g1, x2, f2, g2))
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    with np.errstate(all="ignore"):
        d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
        d2_square = d1**2 - g1 * g2
        if d2_square >= 0:
            d2 = np.sqrt(d2_square)
            if x1 <= x2:
                min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
            else:
                min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
            return float(min(max(min_pos, xmin_bound), xmax_bound))
        return float((xmin_bound + xmax_bound) / 2.0)


def _strong_wolfe(obj_func: Callable[[float], tuple[float, np.ndarray]], t: float, d: np.ndarray, f: float,
                  g: np.ndarray, gtd: float, c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = 1e-9,
                  max_ls: int = 25) -> tuple[float, np.ndarray, float, int]:
    """torch.optim.lbfgs._strong_wolfe: a step t along d meeting the strong Wolfe conditions (f, g, t, evals)."""
    d_norm = float(np.abs(d).max())
    f_new, g_new = obj_func(t)
    ls_func_evals = 1
    gtd_new = float(g_new @ d)

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    done = False
    ls_iter = 0
    bracket: list[float] = []
    bracket_f: list[float] = []
    bracket_g: list[np.ndarray] = []
    bracket_gtd: list[float] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_g, bracket_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_g, bracket_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        # interpolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        # next step
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj_func(t)
        ls_func_evals += 1
        gtd_new = float(g_new @ d)
        ls_iter += 1

    # reached the maximum number of iterations?
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0.0, t], [f, f_new], [g, g_new]

    # zoom phase: refine the bracket until a point satisfies the criteria
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # keep t away from the bracket's ends (insufficient progress otherwise)
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = obj_func(t)
        ls_func_evals += 1
        gtd_new = float(g_new @ d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied or not lower than the lowest point
            bracket[high_pos], bracket_f[high_pos], bracket_g[high_pos], bracket_gtd[high_pos] = t, f_new, g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True  # Wolfe conditions satisfied
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # the old high becomes the new low
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            # the new point becomes the new low
            bracket[low_pos], bracket_f[low_pos], bracket_g[low_pos], bracket_gtd[low_pos] = t, f_new, g_new, gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


class LBFGS(Optimizer):
    """torch.optim.LBFGS: one update = up to max_iter_per_step L-BFGS iterations with a strong-Wolfe line search."""

    name = "LBFGS"
    fields = ("lr", "history_size", "max_iter_per_step", "max_eval_per_step", "tolerance_grad", "tolerance_change",
              "line_search")
    needs_value_and_grad = True
    has_convergence_test = True
    supports_bounds = True
    _ragged = frozenset({"old_dirs", "old_stps", "ro"})

    def __init__(self, lr: float = 1, history_size: int = 10, max_iter_per_step: int = 20,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, line_search: str | None = "strong_wolfe",
                 max_eval_per_step: int | None = None):
        self.lr = _real("lr", lr, lo=0.0, lo_open=True)
        self.history_size = _integer("history_size", history_size, 1)
        self.max_iter_per_step = _integer("max_iter_per_step", max_iter_per_step, 1)
        self.max_eval_per_step = (max(1, self.max_iter_per_step * 5 // 4) if max_eval_per_step is None
                                  else _integer("max_eval_per_step", max_eval_per_step, 1))
        self.tolerance_grad = _real("tolerance_grad", tolerance_grad, lo=0.0)
        self.tolerance_change = _real("tolerance_change", tolerance_change, lo=0.0)
        if line_search not in ("strong_wolfe", None):
            raise ValueError(f"line_search must be 'strong_wolfe' or None (a fixed step of lr), got {line_search!r}")
        self.line_search = line_search
        self._freeze()

    @staticmethod
    def _layout(params: Any) -> tuple[list[np.ndarray], Any, np.dtype]:
        leaves, treedef = _leaves(params)
        if not leaves:
            raise ValueError("LBFGS needs at least one parameter")
        return leaves, treedef, np.result_type(*leaves)

    def init(self, params: Any) -> dict[str, Any]:
        """The torch LBFGS state, as flat vectors over the concatenated parameters (dtype: their result type)."""
        leaves, _, dtype = self._layout(params)
        n = sum(x.size for x in leaves)
        return {"func_evals": 0, "n_iter": 0, "stop": 0, "d": np.zeros(n, dtype), "t": 0.0,
                "old_dirs": np.zeros((0, n), dtype), "old_stps": np.zeros((0, n), dtype), "ro": np.zeros(0),
                "H_diag": 1.0, "prev_flat_grad": np.zeros(n, dtype), "prev_loss": 0.0}

    def stop_reason(self, state: dict[str, Any]) -> str | None:
        """The convergence test that ended the last step (tolerance_grad or tolerance_change), or None."""
        return _STOP_MESSAGES.get(state["stop"])

    def iterations(self, state: Mapping[str, Any]) -> int:
        """torch's `n_iter`: L-BFGS iterations over all updates (up to max_iter_per_step each)."""
        return int(state["n_iter"])

    def update(self, params: Any, grads: Any, state: dict[str, Any], *, loss: Any = None,
               value_and_grad: ValueAndGrad | None = None, bounds: Bounds | None = None,
               on_iteration: OnIteration | None = None) -> tuple[Any, dict[str, Any]]:
        """One torch `LBFGS.step(closure)`; `loss`, `grads` are at `params`, `value_and_grad(params)` evaluates elsewhere.
        With `bounds` (pytrees like params; params within them) the projected variant (the module's doc)."""
        if loss is None or value_and_grad is None:
            raise TypeError("LBFGS.update needs loss= (the loss at params) and value_and_grad= (its line search evaluates)")
        ps, gs_, treedef = _matching(params, grads)
        dtype = np.result_type(*ps)
        shapes = [(x.shape, x.dtype) for x in ps]
        ends = np.cumsum([0] + [x.size for x in ps])

        def flat(xs: list[np.ndarray]) -> np.ndarray:
            return np.concatenate([np.asarray(x, dtype).ravel() for x in xs])

        def tree(x: np.ndarray) -> Any:
            return unflatten(treedef, [x[a:b].reshape(s).astype(dt, copy=False)
                                       for a, b, (s, dt) in zip(ends[:-1], ends[1:], shapes, strict=True)])

        def evaluate(x_new: np.ndarray) -> tuple[float, np.ndarray]:
            value, g = value_and_grad(tree(x_new))
            g_leaves, gdef = _leaves(g, "grads")
            if gdef != treedef:
                raise ValueError("value_and_grad returned grads without the structure of params")
            return float(value), flat(g_leaves)

        box = None
        if bounds is not None:
            sides = []
            for side, tree_ in zip(("lower", "upper"), bounds, strict=True):
                leaves, bdef = _leaves(tree_, f"{side} bounds")
                if bdef != treedef or any(b.shape != p.shape for b, p in zip(leaves, ps, strict=True)):
                    raise ValueError(f"{side} bounds must be a pytree of arrays shaped like params")
                sides.append(flat(leaves))
            box = (sides[0], sides[1])
        x, changed = self._iterate(float(loss), flat(ps), flat(gs_), state, evaluate, box,
                                   None if on_iteration is None else lambda x_, f_: on_iteration(tree(x_), f_))
        return tree(x), {**state, **changed}

    def _iterate(self, loss: float, x: np.ndarray, flat_grad: np.ndarray, state: Mapping[str, Any],
                 evaluate: Callable[[np.ndarray], tuple[float, np.ndarray]], box: tuple[np.ndarray, np.ndarray] | None,
                 report: Callable[[np.ndarray, float | None], Any] | None) -> tuple[np.ndarray, dict[str, Any]]:
        """The iterations of one step from x (loss, gradient at x): the new x and the state's fields that changed."""
        lr, max_iter, max_eval = self.lr, self.max_iter_per_step, self.max_eval_per_step
        tolerance_grad, tolerance_change, history_size = self.tolerance_grad, self.tolerance_change, self.history_size

        def grad_test(x: np.ndarray, g: np.ndarray) -> bool:  # torch's, on the projected gradient with bounds
            return float(np.abs(g if box is None else x - np.clip(x - g, *box)).max()) <= tolerance_grad

        func_evals, state_n_iter = state["func_evals"] + 1, state["n_iter"]
        current_evals = 1
        if grad_test(x, flat_grad):
            return x, {"func_evals": func_evals, "stop": STOP_GRAD}

        d, t, H_diag = state["d"], state["t"], state["H_diag"]
        prev_flat_grad, prev_loss = state["prev_flat_grad"], state["prev_loss"]
        old_dirs, old_stps, ro = list(state["old_dirs"]), list(state["old_stps"]), [float(r) for r in state["ro"]]
        opt_cond = False
        reason = 0
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state_n_iter += 1
            # the descent direction; with bounds, over the variables no bound holds (the others stay)
            free = None if box is None else ~(((x <= box[0]) & (flat_grad > 0)) | ((x >= box[1]) & (flat_grad < 0)))
            if state_n_iter == 1:
                old_dirs, old_stps, ro = [], [], []
                H_diag = 1.0
                d = -flat_grad if free is None else -flat_grad * free
            else:
                H_diag = _remember(flat_grad - prev_flat_grad, d * t, old_dirs, old_stps, ro, history_size, H_diag)
                d = _two_loop(-flat_grad if free is None else -flat_grad * free, old_dirs, old_stps, ro, H_diag)
                if free is not None:
                    d = d * free
            prev_flat_grad = flat_grad
            prev_loss = loss
            # the step length
            g_free = flat_grad if free is None else flat_grad * free
            t = min(1.0, 1.0 / float(np.abs(g_free).sum())) * lr if state_n_iter == 1 else lr
            gtd = float(flat_grad @ d)
            if gtd > -tolerance_change:
                reason = STOP_DIRECTION
                if report is not None:  # an iteration in torch's count, that stays at x
                    report(x, loss)
                break
            ls_func_evals = 0
            known = True  # the loss at the new x is known (evaluated)
            if box is not None:
                x_new, loss, flat_grad, ls_func_evals = _projected_search(evaluate, x, d, t, loss, flat_grad, box,
                                                                          max(1, max_eval - current_evals))
                d, t = x_new - x, 1.0  # the memory's next pair takes the step taken (s = d * t)
                x = x_new
                opt_cond = grad_test(x, flat_grad)
            elif self.line_search == "strong_wolfe":
                # torch passes its line search the default tolerance_change=1e-9, not the optimiser's
                def along(step: float, x0: np.ndarray = x, d0: np.ndarray = d) -> Any:
                    return evaluate(x0 + step * d0)

                loss, flat_grad, t, ls_func_evals = _strong_wolfe(along, t, d, loss, flat_grad, gtd, tolerance_change=1e-9,
                                                                  max_ls=max_eval - current_evals)
                x = x + t * d
                opt_cond = grad_test(x, flat_grad)
            else:
                x = x + t * d
                known = n_iter != max_iter
                if known:
                    loss, flat_grad = evaluate(x)
                    opt_cond = grad_test(x, flat_grad)
                    ls_func_evals = 1
            current_evals += ls_func_evals
            func_evals += ls_func_evals
            if report is not None and report(x, loss if known else None):
                break  # the caller stops the run here
            if box is not None and not np.any(d):
                reason = STOP_STEP  # the projected line search found no lower point
                break
            # the stopping tests, in torch's order
            if n_iter == max_iter or current_evals >= max_eval:
                break
            if opt_cond:
                reason = STOP_GRAD
                break
            if float(np.abs(d * t).max()) <= tolerance_change:
                reason = STOP_STEP
                break
            if abs(loss - prev_loss) < tolerance_change:
                reason = STOP_LOSS
                break
        if reason == 0 and opt_cond:
            reason = STOP_GRAD  # the budget ran out at an optimum: torch's next step would return at once
        n, dtype = x.size, x.dtype
        return x, {"func_evals": func_evals, "n_iter": state_n_iter, "stop": reason, "d": np.asarray(d, dtype),
                   "t": float(t), "old_dirs": np.array(old_dirs, dtype).reshape(-1, n),
                   "old_stps": np.array(old_stps, dtype).reshape(-1, n), "ro": np.array(ro, np.float64),
                   "H_diag": float(H_diag), "prev_flat_grad": np.asarray(prev_flat_grad, dtype),
                   "prev_loss": float(prev_loss)}


def _remember(y: np.ndarray, s: np.ndarray, old_dirs: list, old_stps: list, ro: list, history_size: int,
              H_diag: float) -> float:
    """torch's memory update: keep (y, s) when the curvature y.s > 1e-10 (dropping the oldest pair
    past history_size); returns the new H_diag."""
    ys = float(y @ s)
    if ys > 1e-10:
        if len(old_dirs) == history_size:  # shift the limited memory by one
            old_dirs.pop(0)
            old_stps.pop(0)
            ro.pop(0)
        old_dirs.append(y)
        old_stps.append(s)
        ro.append(1.0 / ys)
        H_diag = ys / float(y @ y)
    return H_diag


def _two_loop(q: np.ndarray, old_dirs: list, old_stps: list, ro: list, H_diag: float) -> np.ndarray:
    """The two-loop recursion: the approximate inverse Hessian times q (torch's operation order)."""
    num_old = len(old_dirs)
    al = [0.0] * num_old
    for i in range(num_old - 1, -1, -1):
        al[i] = float(old_stps[i] @ q) * ro[i]
        q = q + (-al[i]) * old_dirs[i]
    r = q * H_diag
    for i in range(num_old):
        be_i = float(old_dirs[i] @ r) * ro[i]
        r = r + (al[i] - be_i) * old_stps[i]
    return r


def _projected_search(evaluate: Callable[[np.ndarray], tuple[float, np.ndarray]], x: np.ndarray, d: np.ndarray,
                      t: float, f: float, g: np.ndarray, box: tuple[np.ndarray, np.ndarray], max_evals: int,
                      c1: float = 1e-4, tolerance_change: float = 1e-9) -> tuple[np.ndarray, float, np.ndarray, int]:
    """Backtracking along the projected path x(t) = clip(x + t d) until the Armijo condition
    f(x(t)) <= f + c1 g.(x(t) - x) holds (Bertsekas' projected rule); t shrinks by safeguarded
    quadratic interpolation, to between 0.1 and 0.5 of itself. Returns (x, f, g, evaluations) of
    that point or, without one within max_evals evaluations or once the steps shrink below
    tolerance_change, of the lowest point evaluated if it is below f, else of x itself.

    g.(x(t) - x) < 0 for small t whenever g.d < 0 and d is 0 where a bound holds x: a variable at
    a bound that d would push outside has g_i d_i > 0 (else a bound would hold it), so clipping it
    only makes the decrease larger."""
    best = (x, f, g)
    evals = 0
    while evals < max_evals:
        x_new = np.clip(x + t * d, *box)
        step = x_new - x
        if float(np.abs(step).max()) <= tolerance_change:
            break
        decrease = float(g @ step)
        if decrease >= 0:  # a step still long enough to be clipped the wrong way: shorter
            t *= 0.5
            continue
        f_new, g_new = evaluate(x_new)
        evals += 1
        if f_new <= f + c1 * decrease:
            return x_new, f_new, g_new, evals
        if f_new < best[1]:
            best = (x_new, f_new, g_new)
        slope = decrease / t
        curvature = f_new - f - slope * t
        t_q = -slope * t * t / (2 * curvature) if math.isfinite(curvature) and curvature > 0 else 0.5 * t
        t = min(max(t_q, 0.1 * t), 0.5 * t)
    return best[0], best[1], best[2], evals


# ---------------------------------------------------------------- specs

OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Adam, AdamW, LBFGS)}


def from_spec(spec: Mapping[str, Any]) -> Optimizer:
    """The optimiser that `spec()` described (`{"name": "Adam", "lr": ...}`); ValueError naming any bad field."""
    name, cls, fields = _named(spec, OPTIMIZERS, "optimizer", lambda cls: (cls.fields, [
        p.name for p in inspect.signature(cls).parameters.values() if p.default is p.empty]))
    if fields.get("schedule") is not None:
        if not isinstance(fields["schedule"], Mapping):
            raise ValueError(f"{name} schedule must be a schedule's spec (a dict), got {fields['schedule']!r}")
        try:
            fields["schedule"] = schedules.from_json(fields["schedule"])
        except ValueError as e:
            raise ValueError(f"{name} schedule: {e}") from None
    return cls(**fields)
