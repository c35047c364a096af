"""λ schedules for the AMiD assistant: constant, linear and TAID's adaptive momentum schedule.

Protocol: ``schedule.value`` is the λ used for the current optimizer step; after the step,
``schedule.step(loss, global_step, total_steps)`` is called with the step's loss and the number of
optimizer steps done so far (1 after the first step). All state is in ``state_dict()`` so a resumed
run continues exactly.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

__all__ = ["LambdaSchedule", "ConstantSchedule", "LinearSchedule", "TAIDSchedule", "make_schedule"]


class LambdaSchedule:
    """Base class: a λ value that may change after each optimizer step."""

    name = "base"

    @property
    def value(self) -> float:
        raise NotImplementedError

    def step(self, loss: Optional[float], global_step: int, total_steps: int) -> None:
        """Advance after an optimizer step (``global_step`` steps are done out of ``total_steps``)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    @property
    def needs_loss(self) -> bool:
        """Whether :meth:`step` reads the loss (so the trainer must fetch it every step)."""
        return False


class ConstantSchedule(LambdaSchedule):
    """λ fixed for the whole run."""

    name = "constant"

    def __init__(self, lam: float) -> None:
        self.lam = float(lam)

    @property
    def value(self) -> float:
        return self.lam


class LinearSchedule(LambdaSchedule):
    """λ moves linearly from ``start`` (first step) to ``end`` (after the last step)."""

    name = "linear"

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = float(start), float(end)
        self._value = self.start

    @property
    def value(self) -> float:
        return self._value

    def step(self, loss: Optional[float], global_step: int, total_steps: int) -> None:
        progress = min(1.0, global_step / max(1, total_steps))
        self._value = self.start + (self.end - self.start) * progress

    def state_dict(self) -> Dict[str, Any]:
        return {"value": self._value}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._value = float(state["value"])


class TAIDSchedule(LambdaSchedule):
    """TAID's adaptive interpolation time (Shing et al., ICLR 2025), used here as AMiD's λ.

    After each step with loss ``L``: ``rel = (L_prev - L) / (L_prev + 1e-15)``,
    ``m = β m + (1 - β) rel``, ``Δ = step · sigmoid(m) · (1 - t)`` and
    ``t = min(t_end, max(t_start + (t_end - t_start) · progress, t + Δ))``: t never decreases, never
    falls below the linear schedule, and moves faster while the loss is falling. The first call
    only records the loss. ``adaptive=False`` gives the linear schedule. Defaults are TAID's
    (t_start 0.4, t_end 1.0, step 5e-4, momentum 0.99).
    """

    name = "taid"

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, step_size: float = 5e-4, momentum: float = 0.99,
                 adaptive: bool = True) -> None:
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.step_size, self.beta = float(step_size), float(momentum)
        self.adaptive = adaptive
        self.t = self.t_start
        self.prev_loss: Optional[float] = None
        self.momentum = 0.0

    @property
    def value(self) -> float:
        return self.t

    @property
    def needs_loss(self) -> bool:
        return self.adaptive

    def step(self, loss: Optional[float], global_step: int, total_steps: int) -> None:
        progress = min(1.0, global_step / max(1, total_steps))
        target = self.t_start + (self.t_end - self.t_start) * progress
        if not self.adaptive:
            self.t = target
            return
        if loss is None or not math.isfinite(loss):
            raise ValueError(f"amid-distill: the TAID λ schedule needs a finite loss, but got {loss}")
        if self.prev_loss is None:
            self.prev_loss = float(loss)
            return
        rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
        delta = self.step_size * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
        self.t = min(self.t_end, max(target, self.t + delta))
        self.prev_loss = float(loss)

    def state_dict(self) -> Dict[str, Any]:
        return {"t": self.t, "prev_loss": self.prev_loss, "momentum": self.momentum}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.t = float(state["t"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.momentum = float(state["momentum"])


def make_schedule(cfg) -> LambdaSchedule:
    """The schedule a :class:`~amid.distill.DistillConfig` asks for."""
    if cfg.lam_schedule == "constant":
        return ConstantSchedule(cfg.lam)
    if cfg.lam_schedule == "linear":
        return LinearSchedule(cfg.lam_start, cfg.lam_end)
    if cfg.lam_schedule == "taid":
        return TAIDSchedule(cfg.lam_start, cfg.lam_end, cfg.taid_step, cfg.taid_momentum)
    raise ValueError(f"amid-distill: config field 'lam_schedule': expected 'constant', 'linear' or 'taid', "
                     f"but got {cfg.lam_schedule!r}")
