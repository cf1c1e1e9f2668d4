"""Learning-rate schedules: torch.optim.lr_scheduler's, as small serialisable values.

    from gradserve.optim import schedules
    sched = schedules.linear_warmup(100, then=schedules.CosineAnnealingLR(T_max=900))
    opt = optim.Adam(lr=1e-2, schedule=sched)          # SGD, Adam and AdamW take a schedule
    sched.lr(1e-2, step)                                # the lr of the update after `step` updates
    sched.to_json()                                     # {"name": "SequentialLR", "schedules": [...], ...}
    schedules.from_json(sched.to_json()) == sched       # ValueError naming any bad field

`lr(base_lr, k)` is what torch's `optimizer.param_groups[0]["lr"]` holds during the (k+1)-th
`optimizer.step()` when `scheduler.step()` follows every optimizer step, computed in closed form
(torch's recursive updates agree to rounding). A schedule travels inside the optimiser's spec, so
a remote job rebuilds it on the server from JSON: `from_json` accepts only the schedules and
fields below, with their types and ranges, and nothing is ever evaluated.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from ._checks import integer, named, real

__all__ = ["CosineAnnealingLR", "ExponentialLR", "LinearLR", "Schedule", "SequentialLR", "StepLR", "from_json",
           "linear_warmup"]

MAX_DEPTH = 8  # nesting of SequentialLR in a spec
MAX_PARTS = 64  # schedules in one spec, nested ones included


def _power(gamma: float, k: int) -> float:
    """`gamma ** k`, inf where it overflows (as torch's float arithmetic gives), never an error."""
    try:
        return gamma ** k
    except OverflowError:
        return math.inf


class Schedule:
    """A learning-rate schedule: `lr(base_lr, step)`, and its JSON form."""

    name: ClassVar[str] = "Schedule"

    def lr(self, base_lr: float, step: int) -> float:
        """The learning rate of the update that follows `step` updates, from the optimiser's `lr`."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """`{"name": ..., field: value, ...}`: JSON-ready, what `from_json` rebuilds."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]


@dataclass(frozen=True)
class StepLR(Schedule):
    """torch's StepLR: `base_lr * gamma ** (step // step_size)`."""

    step_size: int
    gamma: float = 0.1
    name: ClassVar[str] = "StepLR"

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_size", integer("StepLR step_size", self.step_size, 1))
        object.__setattr__(self, "gamma", real("StepLR gamma", self.gamma, lo=0.0))

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * _power(self.gamma, step // self.step_size)


@dataclass(frozen=True)
class ExponentialLR(Schedule):
    """torch's ExponentialLR: `base_lr * gamma ** step`."""

    gamma: float
    name: ClassVar[str] = "ExponentialLR"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", real("ExponentialLR gamma", self.gamma, lo=0.0))

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * _power(self.gamma, step)


@dataclass(frozen=True)
class CosineAnnealingLR(Schedule):
    """torch's CosineAnnealingLR: `eta_min + (base_lr - eta_min) * (1 + cos(pi * step / T_max)) / 2`
    (back up again past T_max, as torch's)."""

    T_max: int
    eta_min: float = 0.0
    name: ClassVar[str] = "CosineAnnealingLR"

    def __post_init__(self) -> None:
        object.__setattr__(self, "T_max", integer("CosineAnnealingLR T_max", self.T_max, 1))
        object.__setattr__(self, "eta_min", real("CosineAnnealingLR eta_min", self.eta_min, lo=0.0))

    def lr(self, base_lr: float, step: int) -> float:
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * step / self.T_max)) / 2


@dataclass(frozen=True)
class LinearLR(Schedule):
    """torch's LinearLR: the factor goes linearly from start_factor to end_factor over total_iters
    steps, then stays (a warm-up with end_factor=1)."""

    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5
    name: ClassVar[str] = "LinearLR"

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_factor", real("LinearLR start_factor", self.start_factor, lo=0.0, lo_open=True,
                                                      hi=1.0))
        object.__setattr__(self, "end_factor", real("LinearLR end_factor", self.end_factor, lo=0.0, hi=1.0))
        object.__setattr__(self, "total_iters", integer("LinearLR total_iters", self.total_iters, 1))

    def lr(self, base_lr: float, step: int) -> float:
        done = min(step, self.total_iters)
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * done / self.total_iters)


@dataclass(frozen=True)
class SequentialLR(Schedule):
    """torch's SequentialLR: `schedules[i]` from step `milestones[i-1]` on, its own count starting at 0 there."""

    schedules: tuple[Schedule, ...]
    milestones: tuple[int, ...]
    name: ClassVar[str] = "SequentialLR"

    def __post_init__(self) -> None:
        parts, marks = _sequence("SequentialLR schedules", self.schedules), _sequence("SequentialLR milestones",
                                                                                      self.milestones)
        if not parts or not all(isinstance(s, Schedule) for s in parts):
            raise ValueError(f"SequentialLR schedules must be one or more schedules, got {self.schedules!r}")
        marks = tuple(integer(f"SequentialLR milestones[{i}]", m, 1) for i, m in enumerate(marks))
        if len(marks) != len(parts) - 1:
            raise ValueError(f"SequentialLR needs one milestone fewer than schedules, got {len(parts)} schedules and "
                             f"milestones {list(marks)}")
        if any(b <= a for a, b in itertools.pairwise(marks)):
            raise ValueError(f"SequentialLR milestones must increase, got {list(marks)}")
        object.__setattr__(self, "schedules", tuple(parts))
        object.__setattr__(self, "milestones", marks)

    def lr(self, base_lr: float, step: int) -> float:
        i = bisect.bisect_right(self.milestones, step)
        return self.schedules[i].lr(base_lr, step - (self.milestones[i - 1] if i else 0))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "schedules": [s.to_json() for s in self.schedules],
                "milestones": list(self.milestones)}


def linear_warmup(steps: int, then: Schedule | None = None, start_factor: float = 0.01) -> Schedule:
    """The lr ramps linearly from `start_factor * lr` to `lr` over `steps` updates, then follows
    `then` (its step count starting at 0 there), or stays at lr: torch's
    `SequentialLR([LinearLR(start_factor, 1.0, steps), then], milestones=[steps])`."""
    ramp = LinearLR(start_factor=start_factor, end_factor=1.0, total_iters=steps)
    return ramp if then is None else SequentialLR((ramp, then), (ramp.total_iters,))


def _sequence(name: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return tuple(value)


SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (StepLR, ExponentialLR, CosineAnnealingLR, LinearLR,
                                                                      SequentialLR)}


def from_json(spec: Mapping[str, Any] | str) -> Schedule:
    """The schedule that `to_json()` described (a dict, or its JSON text); ValueError naming any bad field."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"a schedule spec is not JSON: {e}") from None
    counted = [0]
    return _build(spec, 0, counted)


def _build(spec: Any, depth: int, counted: list[int]) -> Schedule:
    counted[0] += 1
    if depth > MAX_DEPTH or counted[0] > MAX_PARTS:
        raise ValueError(f"a schedule spec may nest {MAX_DEPTH} deep and hold {MAX_PARTS} schedules at most")
    _, cls, values = named(spec, SCHEDULES, "schedule", lambda cls: (
        [f.name for f in fields(cls)], [f.name for f in fields(cls) if f.default is MISSING]))
    if cls is SequentialLR:
        parts = _sequence("SequentialLR schedules", values["schedules"])
        values["schedules"] = tuple(_build(p, depth + 1, counted) for p in parts)
        values["milestones"] = _sequence("SequentialLR milestones", values["milestones"])
    return cls(**values)
