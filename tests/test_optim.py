"""Optimisers and minimize: torch.optim's trajectories, sklearn's and scipy's optima, minibatches,
bit-identical resumption from a checkpoint, hyper-parameter and spec validation, failures."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import gradserve as gs
from gradserve import optim
from gradserve.minimize import LoopState, OptimizationLoop, OptimizeResult, batch_indices, minimize

# ---------------------------------------------------------------- problems


def rosen(x):
    """scipy.optimize.rosen written with gs ops."""
    return gs.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


ROSEN_X0 = np.tile([1.3, 0.7, 0.8, 1.9, 1.2], 2)  # scipy's usual start, tiled to 10 dimensions

_rng = np.random.default_rng(0)
REG_X = _rng.normal(size=(20, 4))
REG_Y = _rng.normal(size=(20, 3))
REG_P0 = {"w": _rng.normal(size=(4, 3)) * 0.5, "b": _rng.normal(size=3) * 0.1, "s": np.array(1.3)}


def regression(p, X, Y):
    """A smooth non-convex loss over a pytree with a matrix, a vector and a 0-d leaf."""
    return gs.mean((np.tanh(X @ p["w"] + p["b"]) * p["s"] - Y) ** 2)


def logistic(p, X, y, lam):
    """mean(log(1 + exp(-y (w.x + b)))) + lam ||w||^2, written stably; y in {-1, +1}."""
    m = y * (X @ p["w"] + p["b"])
    return gs.mean(gs.maximum(-m, 0.0) + gs.log1p(gs.exp(-gs.abs(m)))) + lam * gs.sum(p["w"] ** 2)


@pytest.fixture(scope="module")
def cancer():
    """Breast-cancer data standardised, sklearn's L2 logistic regression fitted, and the same objective for gs."""
    X, y01 = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    C = 0.5
    n = len(y01)
    # sklearn minimises C * sum(logloss) + ||w||^2 / 2 (intercept not penalised); divided by C n this
    # is mean(logloss) + ||w||^2 / (2 C n). penalty="l2" is the default (passing it is deprecated in 1.8+).
    clf = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(X, y01)
    lam = 1.0 / (2 * C * n)
    y = 2.0 * y01 - 1.0
    p_sk = {"w": clf.coef_[0].copy(), "b": np.array(clf.intercept_[0])}
    loss_sk, grad_sk = gs.value_and_grad(logistic)(p_sk, X, y, lam)
    return {"X": X, "y": y, "lam": lam, "p_sk": p_sk, "loss_sk": float(loss_sk), "grad_sk": grad_sk,
            "p0": {"w": np.zeros(X.shape[1]), "b": np.array(0.0)}}


# ---------------------------------------------------------------- sklearn's and scipy's optima


def test_objective_is_sklearns(cancer):
    # sklearn's solution is a stationary point of our objective: a penalised intercept, a missing 1/n
    # or a different C scaling would leave a gradient of order 1e-4 there
    g = cancer["grad_sk"]
    assert max(np.abs(g["w"]).max(), abs(float(g["b"]))) < 1e-7
    # and the objective's value there, recomputed in plain numpy
    X, y, p = cancer["X"], cancer["y"], cancer["p_sk"]
    m = y * (X @ p["w"] + p["b"])
    assert cancer["loss_sk"] == pytest.approx(np.mean(np.logaddexp(0, -m)) + cancer["lam"] * p["w"] @ p["w"], abs=1e-14)


def test_logistic_regression_lbfgs_reaches_sklearn(cancer):
    res = minimize(logistic, cancer["p0"], args=(cancer["X"], cancer["y"], cancer["lam"]), optimizer=optim.LBFGS())
    assert res.success and res.status == 0 and "L-BFGS converged" in res.message
    assert abs(res.fun - cancer["loss_sk"]) < 1e-8
    assert res.fun >= cancer["loss_sk"] - 1e-12


def test_logistic_regression_adam_reaches_sklearn(cancer):
    res = minimize(logistic, cancer["p0"], args=(cancer["X"], cancer["y"], cancer["lam"]), optimizer=optim.Adam(lr=0.1),
                   steps=1000)
    assert res.success and res.message == "reached steps=1000" and res.nit == 1000
    assert abs(res.fun - cancer["loss_sk"]) < 1e-10
    assert np.abs(res.x["w"] - cancer["p_sk"]["w"]).max() < 1e-4


def test_logistic_regression_minibatch_adam_reaches_sklearn(cancer):
    # args as a pytree: the dict's arrays are sliced (569 = 8 * 64 + 57: batches straddle epochs), lam is not
    def loss(p, data, lam):
        return logistic(p, data["X"], data["y"], lam)

    data = {"X": cancer["X"], "y": cancer["y"]}
    res = minimize(loss, cancer["p0"], args=(data, cancer["lam"]), optimizer=optim.Adam(lr=0.01), steps=3000,
                   batch_size=64, seed=1)
    assert res.success and len(res.history["loss"]) == 3000
    assert abs(res.fun - cancer["loss_sk"]) < 1e-4  # fun is on the full data


def test_rosenbrock_lbfgs_reaches_minimum():
    res = minimize(rosen, ROSEN_X0, optimizer=optim.LBFGS(tolerance_change=1e-12))
    assert res.success and res.status == 0
    assert np.abs(res.x - 1).max() < 1e-6
    assert res.fun < 1e-12
    # torch's defaults stop where scipy's L-BFGS-B does, at about 8e-7 from the minimum
    assert np.abs(minimize(rosen, ROSEN_X0).x - 1).max() < 1e-6


# ---------------------------------------------------------------- torch.optim's trajectories


def _torch_trajectory(make, steps):
    """Parameters after each torch step, fed gradserve's gradients (so only the update formulas differ)."""
    vg = gs.value_and_grad(regression)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in REG_P0.items()}
    opt = make(list(tp.values()))
    out = []
    for _ in range(steps):
        _, g = vg({k: t.detach().numpy().copy() for k, t in tp.items()}, REG_X, REG_Y)
        for k, t in tp.items():
            t.grad = torch.from_numpy(np.array(g[k], dtype=np.float64))
        opt.step()
        out.append({k: t.detach().numpy().copy() for k, t in tp.items()})
    return out


FIRST_ORDER = {
    "sgd": (lambda: optim.SGD(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd-wd": (lambda: optim.SGD(lr=0.1, weight_decay=0.05), lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05)),
    "momentum": (lambda: optim.SGD(lr=0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "momentum-dampening-wd": (lambda: optim.SGD(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
                              lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    "nesterov": (lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    "nesterov-wd": (lambda: optim.SGD(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.02),
                    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.02)),
    "adam": (lambda: optim.Adam(lr=0.05), lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=False)),
    "adam-betas-eps-wd": (lambda: optim.Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
                          lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1,
                                                      foreach=False)),
    "amsgrad": (lambda: optim.Adam(lr=0.05, amsgrad=True), lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True, foreach=False)),
    "amsgrad-wd-small-beta1": (lambda: optim.Adam(lr=0.05, betas=(0.3, 0.9), weight_decay=0.1, amsgrad=True),
                               lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.3, 0.9), weight_decay=0.1, amsgrad=True,
                                                           foreach=False)),
    "adamw": (lambda: optim.AdamW(lr=0.05), lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False)),
    "adamw-wd-amsgrad": (lambda: optim.AdamW(lr=0.05, betas=(0.85, 0.95), weight_decay=0.2, amsgrad=True),
                         lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.85, 0.95), weight_decay=0.2, amsgrad=True,
                                                      foreach=False)),
}


@pytest.mark.parametrize("case", list(FIRST_ORDER))
def test_first_order_trajectory_matches_torch(case):
    ours, theirs = FIRST_ORDER[case]
    steps = 40
    traj = []
    res = minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=ours(), steps=steps, callback=traj.append)
    expected = _torch_trajectory(theirs, steps)
    assert res.nit == res.nstep == len(traj) == steps  # a first-order step is one iteration
    for mine, ref in zip(traj, expected, strict=True):
        for k in ref:
            np.testing.assert_allclose(mine[k], ref[k], rtol=0, atol=1e-10)
    assert np.abs(traj[-1]["w"] - REG_P0["w"]).max() > 0.01  # it went somewhere


def _torch_lbfgs(x0, steps, **kw):
    vg = gs.value_and_grad(rosen)
    t = torch.tensor(x0.copy(), requires_grad=True)
    opt = torch.optim.LBFGS([t], **kw)

    def closure():
        loss, g = vg(t.detach().numpy().copy())
        t.grad = torch.from_numpy(np.array(g))
        return torch.tensor(float(loss), dtype=torch.float64)

    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append((t.detach().numpy().copy(), opt.state[t]["func_evals"], opt.state[t]["n_iter"]))
    return out


@pytest.mark.parametrize(("line_search", "max_iter", "history_size", "lr"), [
    ("strong_wolfe", 20, 10, 1.0),  # the defaults: converges in two steps
    ("strong_wolfe", 3, 4, 1.0),    # short steps and a short memory: the ring buffer and the state across steps
    ("strong_wolfe", 1, 2, 0.5),
    (None, 5, 5, 1e-3),             # torch's fixed step
])
def test_lbfgs_trajectory_matches_torch(line_search, max_iter, history_size, lr):
    opt = optim.LBFGS(lr=lr, history_size=history_size, max_iter_per_step=max_iter, line_search=line_search)
    vg = gs.value_and_grad(rosen)
    state = LoopState.start(ROSEN_X0, opt)
    traj = list(OptimizationLoop(lambda p, a: vg(p), opt, state, steps=15))  # one StepInfo per torch step()
    expected = _torch_lbfgs(ROSEN_X0, len(traj), lr=lr, history_size=history_size, max_iter=max_iter,
                            line_search_fn=line_search)
    for info, (x, _, _) in zip(traj, expected, strict=True):
        np.testing.assert_allclose(info.params, x, rtol=0, atol=1e-10)
    assert state.opt_state["func_evals"] == expected[-1][1]  # the same evaluations, the same iterations
    assert state.opt_state["n_iter"] == expected[-1][2] == opt.iterations(state.opt_state)
    assert sum(i.nfev for i in traj) == state.opt_state["func_evals"]
    res = minimize(rosen, ROSEN_X0, optimizer=opt, steps=15)  # nit is torch's n_iter, nstep its step() calls
    assert (res.nit, res.nstep) == (expected[-1][2], len(traj))


def test_lbfgs_on_a_pytree_matches_torch():
    # torch concatenates the parameters in list order; ours are the pytree's leaves in flatten order
    vg = gs.value_and_grad(regression)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in REG_P0.items()}
    topt = torch.optim.LBFGS(list(tp.values()), max_iter=4, history_size=3, line_search_fn="strong_wolfe")

    def closure():
        loss, g = vg({k: t.detach().numpy().copy() for k, t in tp.items()}, REG_X, REG_Y)
        for k, t in tp.items():
            t.grad = torch.from_numpy(np.array(g[k], dtype=np.float64))
        return torch.tensor(float(loss), dtype=torch.float64)

    opt = optim.LBFGS(max_iter_per_step=4, history_size=3)
    loop = OptimizationLoop(lambda p, a: vg(p, *a), opt, LoopState.start(REG_P0, opt), args=(REG_X, REG_Y), steps=6)
    traj = [info.params for info in loop]
    assert len(traj) == 6
    for mine in traj:
        topt.step(closure)
        for k, t in tp.items():
            np.testing.assert_allclose(mine[k], t.detach().numpy(), rtol=0, atol=1e-10)


def test_lbfgs_float32_keeps_dtype():
    res = minimize(rosen, ROSEN_X0.astype(np.float32), optimizer=optim.LBFGS(), steps=50)
    assert res.x.dtype == np.float32 and res.opt_state["d"].dtype == np.float32
    assert np.abs(res.x - 1).max() < 1e-2


# ---------------------------------------------------------------- minibatches


def test_batch_indices_cover_every_example_once_per_epoch():
    n, b = 10, 4  # not a multiple: batches straddle the epoch boundaries
    stream = np.concatenate([batch_indices(n, b, 7, k) for k in range(10)])  # 40 positions = 4 epochs
    assert all(len(batch_indices(n, b, 7, k)) == b for k in range(10))
    epochs = stream.reshape(4, n)
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled each epoch
    again = np.concatenate([batch_indices(n, b, 7, k) for k in range(10)])
    np.testing.assert_array_equal(stream, again)  # deterministic for a seed
    other = np.concatenate([batch_indices(n, b, 8, k) for k in range(10)])
    assert not np.array_equal(stream, other)


def _count_loss(p, E):
    return gs.sum(E @ p)  # the gradient is how often each example is in the batch


@pytest.mark.parametrize(("n", "b", "steps"), [(12, 4, 3), (10, 4, 5), (10, 4, 3), (7, 7, 2)])
def test_minimize_visits_the_batches(n, b, steps):
    res = minimize(_count_loss, np.zeros(n), args=(np.eye(n),), optimizer=optim.SGD(lr=1.0), steps=steps, batch_size=b,
                   seed=5)
    counts = np.bincount(np.concatenate([batch_indices(n, b, 5, k) for k in range(steps)]), minlength=n)
    np.testing.assert_array_equal(res.x, -counts)
    if steps * b % n == 0:  # whole epochs: every example exactly steps * b / n times
        np.testing.assert_array_equal(res.x, -(steps * b // n) * np.ones(n))
    again = minimize(_count_loss, np.zeros(n), args=(np.eye(n),), optimizer=optim.SGD(lr=1.0), steps=steps,
                     batch_size=b, seed=5)
    np.testing.assert_array_equal(res.x, again.x)


def test_minibatching_does_not_retrace_each_epoch():
    X, Y = REG_X, REG_Y  # 20 examples, batches of 6: straddling batches every epoch
    kw = {"args": (X, Y), "optimizer": optim.SGD(lr=0.01), "batch_size": 6}
    minimize(regression, REG_P0, steps=2, **kw)
    before = gs.cache_info().misses
    minimize(regression, REG_P0, steps=40, **kw)  # 12 epochs
    assert gs.cache_info().misses == before


def test_batch_size_validation():
    kw = {"optimizer": optim.SGD(lr=0.1), "steps": 1}
    with pytest.raises(ValueError, match="batch_size"):
        minimize(regression, REG_P0, args=(REG_X, REG_Y), batch_size=0, **kw)
    with pytest.raises(ValueError, match="batch_size=21"):
        minimize(regression, REG_P0, args=(REG_X, REG_Y), batch_size=21, **kw)
    with pytest.raises(ValueError, match="same length"):
        minimize(regression, REG_P0, args=(REG_X, REG_Y[:10]), batch_size=5, **kw)
    with pytest.raises(ValueError, match="at least one numpy array"):
        minimize(lambda p, c: gs.sum(p * c), np.ones(2), args=(2.0,), batch_size=1, **kw)


# ---------------------------------------------------------------- checkpoints and resumption

RESUME_CASES = {
    "adam-amsgrad-minibatch": (lambda: optim.Adam(lr=0.05, amsgrad=True, weight_decay=0.01), 6),
    "nesterov-minibatch": (lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), 6),
    "adamw-full": (lambda: optim.AdamW(lr=0.05), None),
    "lbfgs-full": (lambda: optim.LBFGS(max_iter_per_step=3, history_size=4), None),
    "lbfgs-minibatch": (lambda: optim.LBFGS(max_iter_per_step=2, history_size=3), 7),
}


def _loop(opt, state, steps, batch_size):
    vg = gs.value_and_grad(regression)
    return OptimizationLoop(lambda p, a: vg(p, *a), opt, state, args=(REG_X, REG_Y), steps=steps, batch_size=batch_size,
                            seed=11)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_from_checkpoint_is_bit_identical(case):
    make, batch_size = RESUME_CASES[case]
    total, k = 12, 5  # with batches of 6 of 20 examples, step 5 is mid-epoch
    opt = make()
    full = LoopState.start(REG_P0, opt)
    whole = _loop(opt, full, total, batch_size)
    infos = list(whole)

    part = LoopState.start(REG_P0, opt)
    first = _loop(opt, part, total, batch_size)
    for info in first:
        if info.step == k:
            break
    buf = io.BytesIO()
    np.savez(buf, **part.to_arrays(opt))  # what a job would store
    buf.seek(0)
    with np.load(buf) as saved:
        arrays = {name: saved[name] for name in saved.files}
    opt2 = optim.from_spec(json.loads(json.dumps(opt.spec())))  # the job spec, through JSON
    resumed_state = LoopState.from_arrays(arrays, opt2, REG_P0)
    resumed = _loop(opt2, resumed_state, total, batch_size)
    rest = list(resumed)

    assert [i.step for i in rest] == [i.step for i in infos[k:]]
    assert [(i.loss, i.grad_norm, i.nfev) for i in rest] == [(i.loss, i.grad_norm, i.nfev) for i in infos[k:]]
    a, b = full.to_arrays(opt), resumed_state.to_arrays(opt2)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert (whole.status, whole.success, whole.message) == (resumed.status, resumed.success, resumed.message)


def test_resuming_a_converged_run_stops_at_once():
    opt = optim.LBFGS()
    vg = gs.value_and_grad(rosen)
    state = LoopState.start(ROSEN_X0, opt)
    loop = OptimizationLoop(lambda p, a: vg(p), opt, state, steps=100)
    list(loop)
    assert loop.status == 0
    again = OptimizationLoop(lambda p, a: vg(p), opt, LoopState.from_arrays(state.to_arrays(opt), opt, ROSEN_X0), steps=100)
    assert list(again) == [] and (again.status, again.message) == (loop.status, loop.message)


def test_checkpoint_mismatches_are_rejected():
    opt = optim.Adam()
    state = LoopState.start(REG_P0, opt)
    arrays = state.to_arrays(opt)
    with pytest.raises(ValueError, match=r"params\.w"):
        LoopState.from_arrays({k: v for k, v in arrays.items() if k != "params.w"}, opt, REG_P0)
    with pytest.raises(ValueError, match=r"exp_avg\.params\.b"):
        LoopState.from_arrays({**arrays, "opt.exp_avg.params.b": np.zeros(4)}, opt, REG_P0)
    with pytest.raises(ValueError, match="unexpected"):
        LoopState.from_arrays({**arrays, "opt.max_exp_avg_sq.params.b": np.zeros(3)}, opt, REG_P0)
    with pytest.raises(ValueError, match="history"):
        LoopState.from_arrays({**arrays, "step": np.array(3)}, opt, REG_P0)


# ---------------------------------------------------------------- the optimisers' state and specs

ALL = [optim.SGD(lr=0.1), optim.SGD(lr=0.1, momentum=0.9, nesterov=True), optim.Adam(), optim.Adam(amsgrad=True),
       optim.AdamW(weight_decay=0.1), optim.LBFGS(), optim.LBFGS(line_search=None, lr=0.01)]


def _is_state_leaf(x):
    return (isinstance(x, np.ndarray) and x.dtype.kind in "fi") or (type(x) in (int, float))


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_state_is_arrays_and_numbers_and_round_trips(opt):
    vg = gs.value_and_grad(regression)
    params = LoopState.start(REG_P0, opt).params
    state = opt.init(params)
    for _ in range(3):
        loss, grads = vg(params, REG_X, REG_Y)
        before_p = {k: v.copy() for k, v in params.items()}
        before_s = opt.state_to_arrays(state)
        new_params, new_state = opt.update(params, grads, state, loss=loss, value_and_grad=lambda p: vg(p, REG_X, REG_Y))
        for k in params:  # functional: the inputs are untouched
            np.testing.assert_array_equal(params[k], before_p[k])
        for name, a in opt.state_to_arrays(state).items():
            np.testing.assert_array_equal(a, before_s[name])
        params, state = new_params, new_state
    assert isinstance(state, dict)
    for _, leaf in gs.flatten(state, "state")[0]:
        assert _is_state_leaf(leaf), leaf
    back = opt.state_from_arrays(opt.state_to_arrays(state), params)
    a, b = opt.state_to_arrays(state), opt.state_to_arrays(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert {k: type(v) for k, v in back.items()} == {k: type(v) for k, v in state.items()}


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_spec_round_trips_through_json(opt):
    spec = opt.spec()
    assert spec["name"] == opt.name
    rebuilt = optim.from_spec(json.loads(json.dumps(spec)))
    assert rebuilt == opt and type(rebuilt) is type(opt) and rebuilt.spec() == spec


def test_optimizers_are_immutable():
    opt = optim.Adam()
    with pytest.raises(AttributeError):
        opt.lr = 1.0


@pytest.mark.parametrize(("make", "name"), [
    (lambda: optim.SGD(lr=-0.1), "lr"),
    (lambda: optim.SGD(lr=float("nan")), "lr"),
    (lambda: optim.SGD(lr="0.1"), "lr"),
    (lambda: optim.SGD(lr=0.1, momentum=-0.5), "momentum"),
    (lambda: optim.SGD(lr=0.1, dampening=1.5), "dampening"),
    (lambda: optim.SGD(lr=0.1, weight_decay=-1e-3), "weight_decay"),
    (lambda: optim.SGD(lr=0.1, nesterov=True), "nesterov"),
    (lambda: optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda: optim.SGD(lr=0.1, nesterov="yes"), "nesterov"),
    (lambda: optim.Adam(lr=-1e-3), "lr"),
    (lambda: optim.Adam(betas=(1.0, 0.999)), r"betas\[0\]"),
    (lambda: optim.Adam(betas=(-0.1, 0.999)), r"betas\[0\]"),
    (lambda: optim.Adam(betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda: optim.Adam(betas=(0.9,)), "betas"),
    (lambda: optim.Adam(eps=-1e-8), "eps"),
    (lambda: optim.Adam(weight_decay=-0.1), "weight_decay"),
    (lambda: optim.Adam(amsgrad=1), "amsgrad"),
    (lambda: optim.AdamW(weight_decay=-0.01), "weight_decay"),
    (lambda: optim.AdamW(betas=(0.9, 1.5)), r"betas\[1\]"),
    (lambda: optim.LBFGS(lr=0), "lr"),
    (lambda: optim.LBFGS(history_size=0), "history_size"),
    (lambda: optim.LBFGS(max_iter_per_step=0), "max_iter_per_step"),
    (lambda: optim.LBFGS(max_iter_per_step=2.5), "max_iter_per_step"),
    (lambda: optim.LBFGS(max_eval_per_step=0), "max_eval_per_step"),
    (lambda: optim.LBFGS(tolerance_grad=-1.0), "tolerance_grad"),
    (lambda: optim.LBFGS(tolerance_change=-1.0), "tolerance_change"),
    (lambda: optim.LBFGS(line_search="armijo"), "line_search"),
])
def test_bad_hyper_parameters_are_rejected(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(("spec", "name"), [
    ({"name": "Adagrad"}, "name"),
    ({"lr": 0.1}, "name"),
    ({"name": ["Adam"]}, "name"),
    ({"name": "Adam", "learning_rate": 0.1}, "learning_rate"),
    ({"name": "Adam", "betas": [0.9, 1.5]}, r"betas\[1\]"),
    ({"name": "SGD"}, "lr"),
    ({"name": "SGD", "lr": -1}, "lr"),
    ({"name": "LBFGS", "line_search": "backtracking"}, "line_search"),
    ("Adam", "spec"),
])
def test_from_spec_rejects_bad_fields(spec, name):
    with pytest.raises(ValueError, match=name):
        optim.from_spec(spec)


def test_minimize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        minimize(rosen, ROSEN_X0, steps=-1)
    with pytest.raises(ValueError, match="tol"):
        minimize(rosen, ROSEN_X0, tol=-1.0)
    with pytest.raises(ValueError, match="seed"):
        minimize(rosen, ROSEN_X0, seed=-1)
    with pytest.raises(TypeError, match="optimizer"):
        minimize(rosen, ROSEN_X0, optimizer="adam")
    with pytest.raises(ValueError, match="lr"):
        minimize(rosen, ROSEN_X0, optimizer={"name": "Adam", "lr": -1})
    with pytest.raises(TypeError, match=r"params\.act"):
        minimize(lambda p: gs.sum(p["w"] ** 2), {"w": np.ones(2), "act": "tanh"})


# ---------------------------------------------------------------- results and stopping


def test_result_is_dict_like():
    res = minimize(rosen, ROSEN_X0, optimizer=optim.SGD(lr=1e-4), steps=5)
    assert isinstance(res, OptimizeResult) and isinstance(res, dict)
    for key in ("x", "fun", "jac", "grad_norm", "nit", "nfev", "njev", "nstep", "success", "status", "message", "history",
                "optimizer", "opt_state"):
        assert res[key] is getattr(res, key)
    assert res.success and res.status == 1 and res.message == "reached steps=5" and res.nit == res.nstep == 5
    assert len(res.history["loss"]) == len(res.history["grad_norm"]) == 5
    assert res.history["loss"][0] == pytest.approx(float(gs.value_and_grad(rosen)(ROSEN_X0)[0]))
    assert res.fun < res.history["loss"][0] and res.nfev == 6  # five steps and the final evaluation
    assert "history" in repr(res)
    with pytest.raises(AttributeError):
        _ = res.nonexistent


def test_default_optimizer():
    assert minimize(rosen, ROSEN_X0).optimizer["name"] == "LBFGS"
    res = minimize(regression, REG_P0, args=(REG_X, REG_Y), steps=3, batch_size=5)
    assert res.optimizer == optim.Adam().spec()


def test_tol_stops_with_success():
    res = minimize(lambda x: gs.sum((x - 3.0) ** 2), np.zeros(4), optimizer=optim.SGD(lr=0.1), steps=1000, tol=1e-6)
    assert res.success and res.status == 0 and "tol" in res.message
    assert res.nit < 1000 and res.grad_norm <= 1e-6 and len(res.history["loss"]) == res.nit
    np.testing.assert_allclose(res.x, 3.0, atol=1e-6)


def test_steps_exhausted_before_tol_is_not_success():
    res = minimize(lambda x: gs.sum((x - 3.0) ** 2), np.zeros(4), optimizer=optim.SGD(lr=0.01), steps=10, tol=1e-6)
    assert not res.success and res.status == 1 and "tol" in res.message
    res = minimize(rosen, ROSEN_X0, optimizer=optim.LBFGS(max_iter_per_step=2), steps=2)
    assert not res.success and res.status == 1 and "LBFGS" in res.message


@pytest.mark.parametrize("how", ["return", "raise"])
@pytest.mark.parametrize("opt", [optim.Adam(), optim.LBFGS()], ids=["adam", "lbfgs"])
def test_callback_stops(how, opt):
    seen = []

    def callback(xk):
        seen.append(xk)
        if len(seen) == 3:
            if how == "raise":
                raise StopIteration
            return True
        return None

    res = minimize(rosen, ROSEN_X0, optimizer=opt, steps=50, callback=callback)
    assert res.nit == 3 and res.status == 99 and not res.success and res.message == "stopped by callback after iteration 3"
    np.testing.assert_array_equal(res.x, seen[-1])  # the run ends at the params the callback saw last


def test_nan_loss_is_reported():
    res = minimize(lambda x: gs.sum(gs.log(x)), np.array([-1.0, 2.0]), optimizer=optim.SGD(lr=0.1), steps=10)
    assert not res.success and res.status == 2 and "nan" in res.message and res.nit == 0
    assert math.isnan(res.fun)


def test_divergence_is_reported():
    res = minimize(lambda x: gs.sum(x ** 4), np.array([3.0]), optimizer=optim.SGD(lr=1.0), steps=100)
    assert not res.success and res.status == 2 and "step" in res.message
    assert 0 < res.nit < 100 and all(math.isfinite(v) for v in res.history["loss"])


def test_infinite_gradient_is_reported():
    res = minimize(lambda x: gs.sum(gs.sqrt(x)), np.array([0.0, 1.0]), optimizer=optim.SGD(lr=0.1), steps=10)
    assert not res.success and res.status == 2 and "gradient" in res.message


def test_float32_params_stay_float32():
    p0 = {k: v.astype(np.float32) for k, v in REG_P0.items()}
    res = minimize(regression, p0, args=(REG_X.astype(np.float32), REG_Y.astype(np.float32)), optimizer=optim.Adam(lr=0.01),
                   steps=5)
    assert all(v.dtype == np.float32 for v in res.x.values())
    assert all(v.dtype == np.float32 for v in res.opt_state["exp_avg"].values())


def test_scalar_and_integer_params_become_float_arrays():
    def f(p):
        return (p["a"] - 2.0) ** 2 + (p["v"][0] - 1.0) ** 2 + gs.sum((p["v"][1] - 1.0) ** 2)

    res = minimize(f, {"a": 0, "v": [0.5, np.array([3])]}, optimizer=optim.SGD(lr=0.25), steps=40)
    assert res.x["a"].dtype == np.float64 and res.x["a"].shape == () and res.x["v"][1].dtype == np.float64
    assert res.x["a"] == pytest.approx(2.0) and res.x["v"][1] == pytest.approx(1.0)
