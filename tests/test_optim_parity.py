"""The SDK's optimisation against scipy and torch: one OptimizeResult locally and remotely (scipy's
fields and meanings), `bounds=` against scipy's L-BFGS-B, scipy's callback semantics, learning-rate
schedules against torch.optim.lr_scheduler (locally and in remote jobs), torch-style state dicts,
gradients in the order of wrt; and the job's plot, progress bar and repr."""

from __future__ import annotations

import io
import json
import sys
import types
import warnings

import grpc
import matplotlib
import numpy as np
import pytest
import scipy.optimize
import torch
import tqdm.std
from matplotlib.figure import Figure
from service_fixtures import wait_until
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from test_optim import REG_P0, REG_X, REG_Y, ROSEN_X0, logistic, regression, rosen

import gradserve as gs
from gradserve import optim
from gradserve import remote as rm
from gradserve.minimize import STOPPED, LoopState, OptimizationLoop, minimize
from gradserve.optim import schedules
from gradserve_engine.v1 import service_pb2 as pb

L = torch.optim.lr_scheduler

# ---------------------------------------------------------------- one OptimizeResult, locally and remotely

FIELDS = {"x", "fun", "jac", "grad_norm", "nit", "nfev", "njev", "nstep", "status", "success", "message", "history",
          "optimizer", "opt_state"}


@pytest.mark.parametrize("opt", [optim.LBFGS(max_iter_per_step=5), optim.Adam(lr=0.05)], ids=["lbfgs", "adam"])
def test_remote_result_is_the_local_one(remote, opt):
    steps = 8 if isinstance(opt, optim.LBFGS) else 60
    local = minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=opt, steps=steps)
    job = remote.minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=opt, steps=steps).wait(timeout=60)
    res = job.result()
    assert set(res) == set(local) == FIELDS
    # scipy's fields, as scipy means them: status an int with its message, nit the optimiser's own iterations
    assert isinstance(res.status, int) and (res.status, res.success, res.message) == (local.status, local.success,
                                                                                       local.message)
    assert res.nit == local.nit == opt.iterations(local.opt_state)
    if isinstance(opt, optim.LBFGS):
        assert res.nit == local.opt_state["n_iter"] > res.nstep  # several L-BFGS iterations per step
    else:
        assert res.nit == res.nstep == steps
    assert (res.nfev, res.njev, res.nstep) == (local.nfev, local.njev, local.nstep) and res.njev == res.nfev
    assert res.optimizer == local.optimizer == opt.spec()  # a dict both ways
    assert res.fun == pytest.approx(local.fun, abs=1e-12) and res.grad_norm == pytest.approx(local.grad_norm, abs=1e-12)
    for k in REG_P0:
        np.testing.assert_allclose(res.x[k], local.x[k], rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.jac[k], local.jac[k], rtol=0, atol=1e-12)
    assert list(res.x) == list(res.jac) == list(REG_P0)  # shaped like params0, in its order
    fun, jac = gs.value_and_grad(regression)(res.x, REG_X, REG_Y)  # fun and jac are the loss and gradient at x
    assert float(fun) == pytest.approx(res.fun, abs=1e-12)
    np.testing.assert_allclose(jac["w"], res.jac["w"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.history["loss"], local.history["loss"], rtol=0, atol=1e-12)
    assert res.history["step"] == list(range(1, res.nstep + 1))
    assert res.opt_state is None and local.opt_state is not None  # the optimiser's state stays on the server
    # a reattached job: the same counts, params by the graph's input names
    again = remote.job(job.id).result()
    assert (again.nit, again.nfev, again.status) == (res.nit, res.nfev, res.status)
    assert set(again.x) == set(again.jac) == {f"p.{k}" for k in REG_P0}


def test_cancelled_and_minibatch_jobs_report_what_they_know(remote):
    job = remote.minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=optim.SGD(lr=1e-3), steps=10**7)
    try:
        assert wait_until(lambda: job.info().step > 0, timeout=30)
        running = job.result()
        # a running job's counts and its row are read a moment apart: both move on, neither is final
        assert running.status is None and not running.success and running.nit > 0 and running.nstep > 0
    finally:
        job.cancel()
    res = job.wait(timeout=30).result()
    assert res.status == STOPPED and not res.success and res.message.startswith("cancelled")
    assert res.nit == res.nstep > 0 and res.nfev == res.nstep and res.jac is None and res.grad_norm is None
    mini = remote.minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=optim.Adam(lr=0.01), steps=5,
                           batch_size=5).wait(timeout=60).result()
    assert (mini.status, mini.nit, mini.nfev) == (1, 5, 5) and mini.jac is None  # no full-data gradient: one minibatch graph


# ---------------------------------------------------------------- bounds: scipy's L-BFGS-B

TIGHT = optim.LBFGS(tolerance_grad=1e-12, tolerance_change=0.0)  # run to the end of float64's precision
SCIPY_TIGHT = {"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000}


def _assert_same_optimum(ours, theirs, lo, hi, atol):
    assert np.all((lo <= ours) & (ours <= hi))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)
    at_lo, at_hi = theirs == lo, theirs == hi
    assert at_lo.any() or at_hi.any()  # the problem has active bounds
    np.testing.assert_array_equal(ours[at_lo], lo[at_lo])  # held exactly where scipy's are
    np.testing.assert_array_equal(ours[at_hi], hi[at_hi])


def test_nonnegative_least_squares_is_scipys():
    rng = np.random.default_rng(0)
    A, b = rng.normal(size=(30, 12)), rng.normal(size=30)

    def half_sq(x, A, b):
        return 0.5 * gs.sum((A @ x - b) ** 2)

    res = minimize(half_sq, np.ones(12), args=(A, b), optimizer=TIGHT, bounds=(0.0, None), steps=100)
    assert res.success and res.status == 0, res.message
    exact, _ = scipy.optimize.nnls(A, b)  # an active-set solver: exact zeros
    lbfgsb = scipy.optimize.minimize(lambda x: 0.5 * np.sum((A @ x - b) ** 2), np.ones(12), jac=lambda x: A.T @ (A @ x - b),
                                     method="L-BFGS-B", bounds=[(0, None)] * 12, options=SCIPY_TIGHT)
    lo, hi = np.zeros(12), np.full(12, np.inf)
    _assert_same_optimum(res.x, exact, lo, hi, atol=1e-8)
    _assert_same_optimum(res.x, lbfgsb.x, lo, hi, atol=1e-6)
    assert res.grad_norm < 1e-6  # the projected gradient vanishes at a bounded optimum; the gradient does not
    assert np.linalg.norm(res.jac) > 1e-2


def test_bounded_rosenbrock_is_scipys():
    lo, hi = np.full(10, -1.0), np.full(10, 0.5)
    res = minimize(rosen, ROSEN_X0, optimizer=TIGHT, bounds=scipy.optimize.Bounds(lo, hi), steps=200)
    ref = scipy.optimize.minimize(scipy.optimize.rosen, np.clip(ROSEN_X0, lo, hi), jac=scipy.optimize.rosen_der,
                                  method="L-BFGS-B", bounds=scipy.optimize.Bounds(lo, hi), options=SCIPY_TIGHT)
    assert res.success and ref.success
    _assert_same_optimum(res.x, ref.x, lo, hi, atol=1e-7)
    assert res.fun == pytest.approx(ref.fun, rel=1e-12)
    # torch's default tolerances stop as scipy's defaults do, near the optimum
    default = minimize(rosen, ROSEN_X0, bounds=(lo, hi))
    _assert_same_optimum(default.x, ref.x, lo, hi, atol=1e-5)


def test_bounds_on_a_pytree_are_scipys():
    X, y01 = load_breast_cancer(return_X_y=True)
    X, y, lam = StandardScaler().fit_transform(X), 2.0 * y01 - 1.0, 1e-3
    p0 = {"w": np.zeros(30), "b": np.array(0.0)}
    box = ({"w": -0.5, "b": -np.inf}, {"w": np.full(30, 0.5), "b": 0.2})  # numbers or arrays per leaf
    res = minimize(logistic, p0, args=(X, y, lam), optimizer=TIGHT, bounds=box, steps=200)
    vg = gs.value_and_grad(logistic)

    def flat_fun(v):
        f, g = vg({"w": v[:30], "b": np.array(v[30])}, X, y, lam)
        return float(f), np.concatenate([g["w"], [float(g["b"])]])

    ref = scipy.optimize.minimize(flat_fun, np.zeros(31), jac=True, method="L-BFGS-B",
                                  bounds=[(-0.5, 0.5)] * 30 + [(None, 0.2)], options=SCIPY_TIGHT)
    ours = np.concatenate([res.x["w"], [res.x["b"]]])
    lo, hi = np.r_[np.full(30, -0.5), -np.inf], np.r_[np.full(30, 0.5), 0.2]
    _assert_same_optimum(ours, ref.x, lo, hi, atol=1e-6)
    assert res.x["b"].shape == () and res.fun == pytest.approx(ref.fun, rel=1e-10)


def test_every_point_evaluated_lies_within_the_bounds():
    lo, hi = np.full(10, -0.3), np.full(10, 0.7)
    vg = gs.value_and_grad(rosen)
    seen = []

    def value_and_grad(p, _):
        seen.append(p.copy())
        return vg(p)

    opt = optim.LBFGS()
    x0 = np.clip(ROSEN_X0, lo, hi)
    loop = OptimizationLoop(value_and_grad, opt, LoopState.start(x0, opt), steps=50, bounds=(lo, hi))
    infos = list(loop)
    assert len(seen) > 20 and loop.success
    assert all(np.all((lo <= p) & (p <= hi)) for p in seen)
    assert all(i.grad_norm >= 0 for i in infos)


def test_float32_bounds_hold_exactly():
    lo = np.float32(0.1)
    res = minimize(lambda x: gs.sum((x + 1.0) ** 2), np.ones(3, np.float32), bounds=(0.1, 2.0))
    assert res.x.dtype == np.float32 and np.array_equal(res.x, np.full(3, lo))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"optimizer": optim.Adam(), "bounds": (0.0, 1.0)}, "LBFGS"),
    ({"bounds": (1.0, 0.0)}, "above its upper bound"),
    ({"bounds": (np.zeros(3), None)}, "broadcast"),
    ({"bounds": (np.nan, None)}, "numbers"),
    ({"bounds": ("a", None)}, "numbers"),
    ({"bounds": 0.0}, "pair"),
    ({"bounds": ({"w": 0.0}, None)}, "shaped like params"),
])
def test_bad_bounds_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        minimize(rosen, ROSEN_X0, steps=2, **kwargs)


# ---------------------------------------------------------------- callback: scipy's semantics


@pytest.mark.parametrize("opt", [optim.LBFGS(), optim.SGD(lr=1e-4, momentum=0.5)], ids=["lbfgs", "sgd"])
def test_callback_sees_every_iteration(opt):
    xs, results = [], []
    res = minimize(rosen, ROSEN_X0, optimizer=opt, steps=20, callback=xs.append)
    res2 = minimize(rosen, ROSEN_X0, optimizer=opt, steps=20, callback=lambda intermediate_result: results.append(
        intermediate_result))
    assert len(xs) == len(results) == res.nit == res2.nit  # once per iteration, as scipy's nit counts them
    np.testing.assert_array_equal(xs[-1], res.x)
    vg = gs.value_and_grad(rosen)
    for r, x in zip(results, xs, strict=True):
        assert isinstance(r, gs.OptimizeResult) and np.array_equal(r.x, x)
        assert r.fun == float(vg(r.x)[0])  # the loss at x, from the evaluation the run made there
    # scipy's own L-BFGS-B calls it once per iteration as well
    count = []
    ref = scipy.optimize.minimize(scipy.optimize.rosen, ROSEN_X0, jac=scipy.optimize.rosen_der, method="L-BFGS-B",
                                  callback=count.append)
    assert len(count) == ref.nit


def test_callback_params_are_copies():
    def vandal(xk):
        xk[:] = np.nan

    res = minimize(rosen, ROSEN_X0, optimizer=optim.LBFGS(max_iter_per_step=3), steps=3, callback=vandal)
    assert np.all(np.isfinite(res.x)) and res.fun == minimize(rosen, ROSEN_X0, optimizer=optim.LBFGS(max_iter_per_step=3),
                                                               steps=3).fun


# ---------------------------------------------------------------- learning-rate schedules: torch.optim.lr_scheduler

SCHEDULES = {
    "step": (schedules.StepLR(step_size=7, gamma=0.5), lambda o: L.StepLR(o, step_size=7, gamma=0.5)),
    "exponential": (schedules.ExponentialLR(gamma=0.93), lambda o: L.ExponentialLR(o, gamma=0.93)),
    "cosine": (schedules.CosineAnnealingLR(T_max=20, eta_min=0.01),
               lambda o: L.CosineAnnealingLR(o, T_max=20, eta_min=0.01)),  # 60 steps: down, up and down again
    "linear-warmup": (schedules.LinearLR(start_factor=0.1, total_iters=10),
                      lambda o: L.LinearLR(o, start_factor=0.1, total_iters=10)),
    "linear-decay": (schedules.LinearLR(start_factor=1.0, end_factor=0.2, total_iters=15),
                     lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=15)),
    "warmup-cosine": (schedules.linear_warmup(5, then=schedules.CosineAnnealingLR(T_max=30)),
                      lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.01, total_iters=5),
                                                   L.CosineAnnealingLR(o, T_max=30)], milestones=[5])),
    "sequential-3": (schedules.SequentialLR((schedules.LinearLR(0.5, 1.0, 3), schedules.StepLR(4, 0.5),
                                             schedules.ExponentialLR(0.9)), (3, 11)),
                     lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.5, 1.0, 3), L.StepLR(o, 4, 0.5),
                                                  L.ExponentialLR(o, 0.9)], milestones=[3, 11])),
}


def _torch_lrs(make, steps, base):
    """torch's lr during each optimizer.step(), scheduler.step() after each."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR steps its parts with an epoch (deprecated in torch)
        sched = make(opt)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_schedule_is_torchs(case):
    ours, theirs = SCHEDULES[case]
    base = 0.1
    np.testing.assert_allclose([ours.lr(base, k) for k in range(60)], _torch_lrs(theirs, 60, base), rtol=1e-12, atol=0)
    spec = json.loads(json.dumps(ours.to_json()))
    assert schedules.from_json(spec) == ours and schedules.from_json(json.dumps(spec)) == ours


@pytest.mark.parametrize(("ours", "theirs"), [
    (lambda s: optim.SGD(lr=0.1, momentum=0.9, schedule=s), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    (lambda s: optim.AdamW(lr=0.05, schedule=s), lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False)),
], ids=["sgd-momentum", "adamw"])
def test_scheduled_trajectory_is_torchs(ours, theirs):
    sched, make_sched = SCHEDULES["warmup-cosine"]
    traj = []
    minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=ours(sched), steps=40, callback=traj.append)
    vg = gs.value_and_grad(regression)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in REG_P0.items()}
    topt = theirs(list(tp.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tsched = make_sched(topt)
        for mine in traj:
            _, g = vg({k: t.detach().numpy().copy() for k, t in tp.items()}, REG_X, REG_Y)
            for k, t in tp.items():
                t.grad = torch.from_numpy(np.array(g[k], dtype=np.float64))
            topt.step()
            tsched.step()
            for k, t in tp.items():
                np.testing.assert_allclose(mine[k], t.detach().numpy(), rtol=0, atol=1e-10)


def test_schedule_travels_in_the_optimizer_spec():
    opt = optim.Adam(lr=0.01, schedule=SCHEDULES["sequential-3"][0])
    spec = json.loads(json.dumps(opt.spec()))
    assert spec["schedule"]["name"] == "SequentialLR" and optim.from_spec(spec) == opt
    assert "schedule" not in optim.Adam().spec()  # without one, the spec of before
    assert optim.from_spec({"name": "SGD", "lr": 0.1, "schedule": None}) == optim.SGD(lr=0.1)


@pytest.mark.parametrize(("spec", "match"), [
    ({"name": "Bogus"}, "schedule spec name must be one of"),
    ({"name": "StepLR"}, "needs field.*step_size"),
    ({"name": "StepLR", "step_size": 3, "gama": 0.1}, "unknown field.*gama"),
    ({"name": "StepLR", "step_size": True}, "step_size must be an integer"),
    ({"name": "StepLR", "step_size": 2.5}, "step_size must be an integer"),
    ({"name": "StepLR", "step_size": 0}, "step_size must be >= 1"),
    ({"name": "ExponentialLR", "gamma": "0.9"}, "gamma must be a real number"),
    ({"name": "ExponentialLR", "gamma": -1}, "gamma must be >= 0"),
    ({"name": "CosineAnnealingLR", "T_max": 10, "eta_min": float("nan")}, "eta_min must be finite"),
    ({"name": "LinearLR", "start_factor": 0}, "start_factor must be > 0"),
    ({"name": "SequentialLR", "schedules": [{"name": "ExponentialLR", "gamma": 0.9}], "milestones": [3]},
     "one milestone fewer"),
    ({"name": "SequentialLR", "schedules": [{"name": "ExponentialLR", "gamma": 0.9}] * 3, "milestones": [5, 5]},
     "must increase"),
    ({"name": "SequentialLR", "schedules": {"name": "ExponentialLR"}, "milestones": []}, "must be a list"),
    ({"name": "SequentialLR", "schedules": ["__import__('os')"], "milestones": []}, "must be a dict"),
    ("[1, 2", "not JSON"),
    ("7", "must be a dict"),
])
def test_bad_schedule_specs_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        schedules.from_json(spec)


def test_schedule_nesting_is_bounded():
    spec = {"name": "ExponentialLR", "gamma": 0.9}
    for _ in range(schedules.MAX_DEPTH + 2):
        spec = {"name": "SequentialLR", "schedules": [spec], "milestones": []}
    with pytest.raises(ValueError, match="nest"):
        schedules.from_json(spec)


def test_optimizer_specs_with_bad_schedules_are_named():
    with pytest.raises(ValueError, match=r"Adam schedule: .*gamma"):
        optim.from_spec({"name": "Adam", "schedule": {"name": "ExponentialLR", "gamma": "x"}})
    with pytest.raises(ValueError, match="schedule must be a schedule's spec"):
        optim.from_spec({"name": "Adam", "schedule": '{"name": "ExponentialLR", "gamma": 0.9}'})
    with pytest.raises(ValueError, match=r"unknown field.*schedule"):
        optim.from_spec({"name": "LBFGS", "schedule": {"name": "ExponentialLR", "gamma": 0.9}})
    with pytest.raises(ValueError, match="schedule must be"):
        optim.SGD(lr=0.1, schedule=lambda step: 0.1)


def test_remote_job_runs_the_schedule(remote):
    opt = optim.Adam(lr=0.05, schedule=SCHEDULES["warmup-cosine"][0])
    local = minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=opt, steps=40)
    res = remote.minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=opt, steps=40).wait(timeout=60).result()
    assert res.optimizer == opt.spec()
    for k in REG_P0:
        np.testing.assert_allclose(res.x[k], local.x[k], rtol=0, atol=1e-12)
    unscheduled = minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=optim.Adam(lr=0.05), steps=40)
    assert np.abs(unscheduled.x["w"] - res.x["w"]).max() > 1e-3  # the schedule made a difference
    bad = {"name": "Adam", "lr": 0.05, "schedule": {"name": "CosineAnnealingLR", "T_max": -1}}
    with pytest.raises(rm.RemoteError, match="T_max must be >= 1") as e:
        remote.minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=bad, steps=5)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- state_dict / load_state_dict (torch's)


def test_state_dict_holds_torchs_state_and_resumes():
    opt = optim.Adam(lr=0.05, amsgrad=True)
    vg = gs.value_and_grad(regression)
    params, state = REG_P0, opt.init(REG_P0)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in REG_P0.items()}
    topt = torch.optim.Adam(list(tp.values()), lr=0.05, amsgrad=True, foreach=False)
    for _ in range(5):
        _, g = vg(params, REG_X, REG_Y)
        params, state = opt.update(params, g, state)
        for k, t in tp.items():
            t.grad = torch.from_numpy(np.array(g[k], dtype=np.float64))
        topt.step()
    sd = opt.state_dict(state)
    theirs = topt.state_dict()
    assert sd["optimizer"] == opt.spec() and theirs["param_groups"][0]["lr"] == sd["optimizer"]["lr"]
    for i, k in enumerate(tp):  # torch keys its state by parameter index, ours by path
        assert int(sd["state"]["step"]) == int(theirs["state"][i]["step"])
        for field in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            np.testing.assert_allclose(sd["state"][f"{field}.{k}"], theirs["state"][i][field].numpy(),
                                       rtol=0, atol=1e-12)
    buf = io.BytesIO()  # it saves as JSON plus an npz
    np.savez(buf, **sd["state"])
    buf.seek(0)
    with np.load(buf) as z:
        loaded = {"optimizer": json.loads(json.dumps(sd["optimizer"])), "state": {n: z[n] for n in z.files}}
    restored = opt.load_state_dict(loaded, params)
    _, g = vg(params, REG_X, REG_Y)
    a, _ = opt.update(params, g, state)
    b, _ = opt.update(params, g, restored)
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_load_state_dict_refuses_what_does_not_fit():
    adam = optim.Adam()
    sd = adam.state_dict(adam.init(REG_P0))
    with pytest.raises(ValueError, match="'Adam''s; it cannot be loaded into SGD"):
        optim.SGD(lr=0.1, momentum=0.9).load_state_dict(sd, REG_P0)
    with pytest.raises(ValueError, match="exactly the keys"):
        adam.load_state_dict(sd["state"], REG_P0)
    with pytest.raises(ValueError, match=r"exp_avg\.w"):
        adam.load_state_dict(sd, {**REG_P0, "w": np.zeros((5, 3))})
    lbfgs = optim.LBFGS()
    state = lbfgs.init(ROSEN_X0)
    assert lbfgs.load_state_dict(lbfgs.state_dict(state), ROSEN_X0).keys() == state.keys()


# ---------------------------------------------------------------- results keep the order of wrt


def test_gradients_come_in_the_order_of_wrt(remote):
    def f(a, b, c):
        return gs.sum(a * b * c)

    x = [np.arange(3.0) + i for i in range(3)]
    g = gs.trace(f, *x)
    inputs = dict(zip(g.input_names(), x, strict=True))
    for wrt in (["c", "a", "b"], ["b", "c"], ["a", "b", "c"]):
        assert list(remote.gradient(g, inputs, wrt=wrt).grads) == wrt
        assert [list(r.grads) for r in remote.batch_gradient(g, [inputs, inputs], wrt=wrt)] == [wrt, wrt]


# ---------------------------------------------------------------- the job's plot, progress bar and repr


def test_plot_draws_on_a_figure_of_its_own(remote, tmp_path, monkeypatch):
    job = remote.minimize(regression, REG_P0, args=(REG_X, REG_Y), optimizer=optim.Adam(lr=0.05), steps=50,
                          batch_size=5).wait(timeout=60)
    pyplot_before = "matplotlib.pyplot" in sys.modules
    backend = matplotlib.rcParams._get_backend_or_none()

    def no_backend_change(*args, **kwargs):
        raise AssertionError("plot must not change the matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", no_backend_change)
    fig = job.plot()
    assert isinstance(fig, Figure) and ("matplotlib.pyplot" in sys.modules) == pyplot_before
    assert matplotlib.rcParams._get_backend_or_none() == backend
    (line,) = fig.axes[0].lines
    history = job.history()
    assert list(line.get_xdata()) == history["step"] == list(range(1, 51)) and list(line.get_ydata()) == history["loss"]
    w = 0.8
    smoothed = job.plot(tmp_path / "loss.png", smooth=w)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw, ema = smoothed.axes[0].lines
    loss = np.array(history["loss"])
    # TensorBoard's debiased EMA is the average of the values so far weighted w**age
    expected = [np.dot(w ** np.arange(t, -1, -1), loss[:t + 1]) / np.sum(w ** np.arange(t + 1)) for t in range(len(loss))]
    np.testing.assert_allclose(ema.get_ydata(), expected, rtol=1e-12)
    np.testing.assert_array_equal(raw.get_ydata(), loss)
    assert np.std(np.diff(ema.get_ydata())) < np.std(np.diff(loss))  # smoother
    with pytest.raises(ValueError, match="smooth"):
        job.plot(smooth=1.0)


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _fake_session(steps, clock, seconds_per_step):
    """A session whose job runs `steps` steps, each `seconds_per_step` on `clock`; any other call fails."""
    job = pb.Job(job_id="f00d", status="running", step=0, steps=steps)

    def call(method, request, *args, **kwargs):
        assert method == "GetJob", method
        return pb.GetJobResponse(job=job)

    def watch(request, timeout=None, metadata=None):
        for k in range(1, steps + 1):
            clock.now += seconds_per_step
            yield pb.JobEvent(job_id="f00d", step=k, loss=1.0 / k, status="running" if k < steps else "succeeded")

    return types.SimpleNamespace(_call=call, _stub=types.SimpleNamespace(WatchJob=watch), _metadata=())


def test_progress_bar_redraws_a_few_times_a_second(monkeypatch, capsys):
    steps, per_step = 20_000, 0.001  # a 20 s job of 20k steps
    clock = _Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)  # tqdm reads its clock through this name
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)
    draws = []
    display = tqdm.std.tqdm.display
    monkeypatch.setattr(tqdm.std.tqdm, "display", lambda self, *a, **k: draws.append(self.n) or display(self, *a, **k))
    job = rm.Job(_fake_session(steps, clock, per_step), "f00d")
    assert job.wait(progress=True) is job
    assert draws[-1] == steps and "20000/20000" in capsys.readouterr().err
    assert 10 <= len(draws) <= steps * per_step / 0.25 + 3  # at most 4 a second (was one per step)


def _refuse(*args, **kwargs):
    raise AssertionError("repr called the server")


class _Refuse:
    """A stub whose every RPC fails the test."""

    def __getattr__(self, name):
        return _refuse


def test_repr_makes_no_call():
    with gs.connect("127.0.0.1:1", timeout=60) as dead:  # nothing listens there: a call would wait out its deadline
        dead._call, dead._stub = _refuse, _Refuse()
        assert repr(rm.Job(dead, "0123456789abcdef")) == "Job('0123456789abcdef')"
    session = _fake_session(10, _Clock(), 0.0)
    job = rm.Job(session, "f00d")
    job.info()  # what a call learnt is shown
    session._call = _refuse
    assert repr(job) == "Job('f00d', running at step 0/10 when last seen)"


def test_schedules_overflow_to_inf_and_refuse_counts_past_2_53():
    """A growing schedule gives inf, as torch's float arithmetic does (a job then ends as
    non-finite), never an OverflowError; counts no float can hold are refused when parsed."""
    from gradserve.optim import schedules

    assert schedules.from_json({"name": "ExponentialLR", "gamma": 2.0}).lr(0.1, 2000) == float("inf")
    assert schedules.from_json({"name": "StepLR", "step_size": 1, "gamma": 1e308}).lr(0.1, 3) == float("inf")
    for spec in ({"name": "CosineAnnealingLR", "T_max": 10**400}, {"name": "LinearLR", "total_iters": 2**53 + 1}):
        with pytest.raises(ValueError, match="at most 2\\*\\*53") as info:
            schedules.from_json(spec)
        assert len(str(info.value)) < 200
