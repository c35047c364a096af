"""Student-generated outputs (SGO) as in DistiLLM (Ko et al., ICML 2024): adaptive switch + replay buffer.

Per optimizer step one uniform draw ``u`` picks the batch source, with the adaptive threshold θ
and ``s = θ · ratio(step)`` (ratio: 0.5 for ``constant``, step/total for ``increasing``,
1 - step/total for ``decreasing``):

* ``u < s``, or ``u < θ`` while the replay buffer holds fewer than ``capacity`` sequences:
  the student samples fresh responses to the batch's prompts (they are also stored in the buffer);
* else ``u < θ``: the batch is drawn from the replay buffer;
* else: the dataset batch is used as is.

θ starts at ``init_threshold`` and rises by 0.1 (at most to 1) whenever the validation loss is
worse than the reference by at least ``loss_eps``, i.e. when it has stopped improving; the
reference is the best validation loss so far (starting with the one before training) and moves
to the new value each time θ rises. This is DistiLLM's ``adaptive`` type with one change: DistiLLM
keeps the reference at the pre-training loss until the first rise, so its switch fires only once
the loss climbs back above where it started; tracking the best value reacts when it stalls.
The draw uses an RNG that is seeded the same on every rank, so all ranks take the same kind of
batch at each step (under FSDP generation is a collective).
"""
from __future__ import annotations

import random
from collections import deque
from typing import Any, Deque, Dict, List, Optional

__all__ = ["ReplayBuffer", "AdaptiveSGO", "DATA", "GENERATE", "REPLAY"]

DATA, GENERATE, REPLAY = "data", "generate", "replay"

Sequence = Dict[str, List[int]]


class ReplayBuffer:
    """A FIFO of at most ``capacity`` token sequences (``{"input_ids", "labels"}`` lists), sampled uniformly."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"amid-distill: config field 'sgo_capacity': expected an integer >= 1, but got {capacity}")
        self.capacity = int(capacity)
        self._items: Deque[Sequence] = deque(maxlen=self.capacity)
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def add(self, items: List[Sequence]) -> None:
        """Append sequences; the oldest are dropped beyond the capacity."""
        for it in items:
            self._items.append({"input_ids": list(it["input_ids"]), "labels": list(it["labels"])})

    def sample(self, n: int) -> List[Sequence]:
        """``n`` sequences drawn uniformly (without replacement when the buffer holds at least ``n``)."""
        if not self._items:
            raise RuntimeError("amid-distill: cannot sample from an empty replay buffer")
        items = list(self._items)
        if n <= len(items):
            picked = self._rng.sample(items, n)
        else:
            picked = [self._rng.choice(items) for _ in range(n)]
        return [{"input_ids": list(x["input_ids"]), "labels": list(x["labels"])} for x in picked]

    def state_dict(self) -> Dict[str, Any]:
        return {"capacity": self.capacity, "items": [dict(x) for x in self._items], "rng": self._rng.getstate()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self._items = deque(state["items"], maxlen=self.capacity)
        self._rng.setstate(state["rng"])


class AdaptiveSGO:
    """DistiLLM's adaptive choice between dataset, fresh student samples and replayed samples."""

    def __init__(self, init_threshold: float = 0.0, loss_eps: float = 0.1, replay_ratio: str = "decreasing",
                 seed: int = 0, increment: float = 0.1) -> None:
        if replay_ratio not in ("constant", "increasing", "decreasing"):
            raise ValueError("amid-distill: config field 'sgo_replay_ratio': expected 'constant', 'increasing' or "
                             f"'decreasing', but got {replay_ratio!r}")
        self.threshold = float(init_threshold)
        self.loss_eps = float(loss_eps)
        self.replay_ratio = replay_ratio
        self.increment = float(increment)
        self.ref_loss: Optional[float] = None
        self._rng = random.Random(seed)
        self.counts = {DATA: 0, GENERATE: 0, REPLAY: 0}

    def sample_threshold(self, step: int, total_steps: int) -> float:
        frac = min(1.0, step / max(1, total_steps))
        if self.replay_ratio == "constant":
            return self.threshold * 0.5
        if self.replay_ratio == "increasing":
            return self.threshold * frac
        return self.threshold * (1.0 - frac)

    def choose(self, step: int, total_steps: int, buffer_len: int, capacity: int) -> str:
        """The batch source for optimizer step ``step`` (0-based): ``'data'``, ``'generate'`` or ``'replay'``."""
        u = self._rng.random()
        s = self.sample_threshold(step, total_steps)
        if u < s or (u < self.threshold and buffer_len < capacity):
            kind = GENERATE
        elif u < self.threshold:
            kind = REPLAY  # the buffer is full here
        else:
            kind = DATA
        self.counts[kind] += 1
        return kind

    def observe(self, val_loss: float) -> bool:
        """Feed a validation loss; returns True when the threshold rose."""
        if self.ref_loss is None:
            self.ref_loss = float(val_loss)
            return False
        if val_loss >= self.ref_loss + self.loss_eps:
            self.threshold = min(1.0, round(self.threshold + self.increment, 10))
            self.ref_loss = float(val_loss)
            return True
        self.ref_loss = min(self.ref_loss, float(val_loss))
        return False

    @property
    def generated_share(self) -> float:
        """Fraction of the steps so far trained on student-generated sequences (fresh or replayed)."""
        n = sum(self.counts.values())
        return 0.0 if n == 0 else (self.counts[GENERATE] + self.counts[REPLAY]) / n

    def state_dict(self) -> Dict[str, Any]:
        return {"threshold": self.threshold, "ref_loss": self.ref_loss, "rng": self._rng.getstate(),
                "counts": dict(self.counts)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.ref_loss = state["ref_loss"]
        self._rng.setstate(state["rng"])
        self.counts = dict(state["counts"])
