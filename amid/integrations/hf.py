"""amid in the plain Hugging Face ``Trainer``: a ready ``compute_loss_func`` and callbacks.

    from transformers import Trainer
    from amid.distill import TAIDSchedule
    from amid.integrations.hf import AMiDComputeLoss, LambdaScheduleCallback

    loss_fn = AMiDComputeLoss(teacher, student, kd_weight=0.5, alpha=0.5, lam=0.1, divergence="ab")
    trainer = Trainer(model=student, args=args, train_dataset=ds, compute_loss_func=loss_fn,
                      callbacks=[LambdaScheduleCallback(TAIDSchedule(), loss_fn)])
    trainer.train()

How it works. ``Trainer.compute_loss`` pops the labels, calls ``model(**inputs)`` and hands only the
outputs and labels to ``compute_loss_func``. :class:`AMiDComputeLoss` therefore registers a
forward pre-hook on the student that runs the frozen teacher (``eval()``, ``torch.no_grad()``) on
the same ``input_ids`` / ``attention_mask`` and keeps its logits for the loss call that follows
(not for calls that ask for a KV cache, ``use_cache=True`` or a cache given: ``generate()``).
The loss is the one of ``amid-distill``:

    kd_weight · AMiD(student, teacher) + (1 − kd_weight) · CE(student, labels)

over the shifted positions (logits at i predict the label at i + 1; ``-100`` ignored), both sums
divided by ``num_items_in_batch`` (the Trainer's count of kept labels in the whole accumulated
batch, so gradient accumulation equals one big batch) or, without it, by this micro-batch's count.

The callbacks reuse :mod:`amid.distill.schedules` and :mod:`amid.distill.sgo` (same state, same
rules as ``amid-distill``):

- :class:`LambdaScheduleCallback`: sets the loss's λ from a schedule before each optimizer step
  and advances it after (TAID's adaptive schedule gets the step's loss); logs ``amid_lambda``;
  its state is written to ``amid_callbacks.json`` in each checkpoint (:meth:`load_checkpoint`).
- :class:`AdaptiveSGOCallback`: DistiLLM's adaptive student-generation controller: each evaluation's
  ``eval_loss`` may raise the threshold; before each step it sets the probability of training on
  fresh student generations on a target that generates (e.g. TRL's ``GKDTrainer.lmbda``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as _amid

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("amid.integrations.hf needs transformers: pip install transformers accelerate") from e

__all__ = ["AMiDComputeLoss", "LambdaScheduleCallback", "AdaptiveSGOCallback", "amid_kd_loss"]

_STATE_FILE = "amid_callbacks.json"


def amid_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor], *, kd_weight: float = 1.0,
                 num_items_in_batch: Optional[Union[int, float, Tensor]] = None, shift: bool = True,
                 ignore_index: int = -100, **options) -> Dict[str, Optional[Tensor]]:
    """``kd_weight·AMiD + (1 − kd_weight)·CE`` on (shifted) causal-LM logits, normalised by
    ``num_items_in_batch`` (or this batch's kept rows). Returns ``{"loss", "kd", "ce"}`` (kd / ce
    detached, None when their weight is 0). ``options``: any :func:`amid.amid_loss` option
    (``alpha``, ``lam``, ``divergence``, ``order``, ``temperature``, ``vocab_size``, ...)."""
    if shift:
        student_logits, teacher_logits = student_logits[..., :-1, :], teacher_logits[..., :-1, :]
        labels = None if labels is None else labels[..., 1:]
    norm = num_items_in_batch
    if isinstance(norm, Tensor):
        norm = norm.to(student_logits.device)
    loss = student_logits.new_zeros((), dtype=torch.float32)
    kd = ce = None
    if kd_weight != 0:
        kd = _amid.amid_loss(student_logits, teacher_logits, labels, ignore_index=ignore_index, normalizer=norm,
                             _fn="integrations.hf", **options)
        loss = loss + kd_weight * kd
    if kd_weight != 1:
        if labels is None:
            raise ValueError("amid.integrations.hf: expected labels with kd_weight != 1 (the cross-entropy needs "
                             "them), but got None")
        v = options.get("vocab_size") or student_logits.shape[-1]
        flat = student_logits[..., :v].reshape(-1, v).float()
        ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
        denom = norm if norm is not None else (labels != ignore_index).sum().clamp_min(1)
        ce = ce / denom
        loss = loss + (1.0 - kd_weight) * ce
    return {"loss": loss, "kd": None if kd is None else kd.detach(), "ce": None if ce is None else ce.detach()}


class AMiDComputeLoss:
    """``compute_loss_func`` for ``transformers.Trainer`` with a frozen teacher.

    Args:
        teacher: the teacher model (frozen here: ``eval()``, ``requires_grad_(False)``); it must
            accept the student's ``input_ids`` (same tokenizer). Place it on the student's device.
        student: the model given to the Trainer (a PEFT model works: the hook sits on whatever
            module the Trainer calls); pass None and call :meth:`attach` later.
        kd_weight: weight of the AMiD term; ``1 − kd_weight`` weighs the cross-entropy on the labels.
        alpha, lam, divergence, order, ab_alpha, ab_beta, temperature, scale_by_t2,
            detach_assistant, vocab_size: the :func:`amid.amid_loss` options (defaults α = 0.5, λ = 0.1).
            ``lam`` is an attribute a schedule may change between steps.

    After each call ``last`` holds the micro-batch's ``{"loss", "kd", "ce"}`` (detached).
    """

    def __init__(self, teacher: nn.Module, student: Optional[nn.Module] = None, *, kd_weight: float = 1.0,
                 alpha: float = _amid.DEFAULT_ALPHA, lam: float = _amid.DEFAULT_LAM, divergence: str = "kl",
                 order: str = "pr", ab_alpha: float = 0.2, ab_beta: float = 0.7, temperature: float = 1.0,
                 scale_by_t2: bool = False, detach_assistant: bool = False, vocab_size: Optional[int] = None) -> None:
        if not 0.0 <= float(kd_weight) <= 1.0:
            raise ValueError(f"amid.integrations.hf.AMiDComputeLoss: expected kd_weight in [0, 1], but got {kd_weight}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd_weight = float(kd_weight)
        self.alpha, self.lam, self.divergence, self.order = float(alpha), float(lam), divergence, order
        self.ab_alpha, self.ab_beta, self.temperature = float(ab_alpha), float(ab_beta), float(temperature)
        self.scale_by_t2, self.detach_assistant, self.vocab_size = bool(scale_by_t2), bool(detach_assistant), vocab_size
        self._teacher_logits: Optional[Tensor] = None
        self._handle = None
        self.last: Dict[str, Optional[Tensor]] = {}
        self._step_sum: Optional[Tensor] = None
        self._step_calls = 0
        self._step_normalized = True
        if student is not None:
            self.attach(student)

    # -- the teacher runs in a forward pre-hook of the student ------------------------------------
    def attach(self, student: nn.Module) -> "AMiDComputeLoss":
        """Run the teacher whenever ``student`` is called (replaces an earlier attachment)."""
        self.detach()
        self._handle = student.register_forward_pre_hook(self._run_teacher, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _run_teacher(self, module, args, kwargs):
        if kwargs.get("use_cache") is True or any(kwargs.get(k) is not None for k in ("past_key_values", "cache")):
            return None  # generate() (it asks for a KV cache): no loss follows
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("amid.integrations.hf.AMiDComputeLoss: expected the student to be called with "
                             "input_ids (the teacher needs them), but got none")
        dev = next(self.teacher.parameters()).device
        teacher_kwargs = {"input_ids": input_ids.to(dev)}
        if kwargs.get("attention_mask") is not None:
            teacher_kwargs["attention_mask"] = kwargs["attention_mask"].to(dev)
        self.teacher.eval()
        with torch.no_grad():
            self._teacher_logits = self.teacher(**teacher_kwargs).logits
        return None

    # -- the loss ------------------------------------------------------------------------------------
    @property
    def options(self) -> Dict[str, Any]:
        return dict(alpha=self.alpha, lam=self.lam, divergence=self.divergence, order=self.order,
                    ab_alpha=self.ab_alpha, ab_beta=self.ab_beta, temperature=self.temperature,
                    scale_by_t2=self.scale_by_t2, detach_assistant=self.detach_assistant, vocab_size=self.vocab_size)

    def __call__(self, outputs, labels: Optional[Tensor], num_items_in_batch=None) -> Tensor:
        if self._teacher_logits is None:
            raise RuntimeError("amid.integrations.hf.AMiDComputeLoss: no teacher logits for this batch: attach the "
                               "loss to the model the Trainer calls (AMiDComputeLoss(teacher, student) or .attach)")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        t = self._teacher_logits.to(logits.device)
        self._teacher_logits = None  # one teacher forward per student forward
        out = amid_kd_loss(logits, t.to(logits.dtype), labels, kd_weight=self.kd_weight,
                           num_items_in_batch=num_items_in_batch, **self.options)
        self.last = out
        if torch.is_grad_enabled():  # training micro-batch: accumulate the optimizer step's loss
            v = out["loss"].detach()
            self._step_sum = v if self._step_sum is None else self._step_sum + v
            self._step_calls += 1
            self._step_normalized = num_items_in_batch is not None
        return out["loss"]

    def pop_step_loss(self, read: bool = True) -> Optional[float]:
        """The loss of the optimizer step just taken (sum of its micro-batches' losses when they were
        normalised by the whole batch, else their mean), and reset. One host sync (none with
        ``read=False``, which only resets)."""
        if self._step_sum is None or not read:
            self._step_sum, self._step_calls = None, 0
            return None
        v = float(self._step_sum) / (1 if self._step_normalized else max(self._step_calls, 1))
        self._step_sum, self._step_calls = None, 0
        return v


def _read_state(checkpoint_dir: str) -> Dict[str, Any]:
    path = os.path.join(checkpoint_dir, _STATE_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_state(args, state, key: str, value: Dict[str, Any]) -> None:
    if not state.is_world_process_zero:
        return
    ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    os.makedirs(ckpt, exist_ok=True)
    cur = _read_state(ckpt)
    cur[key] = value
    with open(os.path.join(ckpt, _STATE_FILE), "w") as f:
        json.dump(cur, f)


class LambdaScheduleCallback(TrainerCallback):
    """Drive ``loss_fn.lam`` (or another attribute) from an :mod:`amid.distill.schedules` schedule.

    ``schedule``: a :class:`~amid.distill.LambdaSchedule` (constant, linear, TAID); ``loss_fn``: any
    object with the attribute (an :class:`AMiDComputeLoss`, :class:`amid.AMiDLoss`, a TRL trainer
    of :mod:`amid.integrations.trl`). Before each optimizer step ``loss_fn.<attribute> =
    schedule.value``; after it ``schedule.step(step_loss, global_step, max_steps)``, where the step
    loss comes from ``loss_fn.pop_step_loss()`` when the schedule needs it (TAID's adaptive mode).
    """

    def __init__(self, schedule, loss_fn, attribute: str = "lam") -> None:
        self.schedule, self.loss_fn, self.attribute = schedule, loss_fn, attribute

    def on_train_begin(self, args, state, control, **kwargs):
        setattr(self.loss_fn, self.attribute, float(self.schedule.value))

    def on_step_begin(self, args, state, control, **kwargs):
        setattr(self.loss_fn, self.attribute, float(self.schedule.value))

    def on_step_end(self, args, state, control, **kwargs):
        loss = None
        pop = getattr(self.loss_fn, "pop_step_loss", None)
        if pop is not None:
            loss = pop(read=self.schedule.needs_loss)
        if self.schedule.needs_loss and loss is None:
            raise RuntimeError("amid.integrations.hf.LambdaScheduleCallback: this schedule needs the step's loss, "
                               "but the loss object does not record it (use AMiDComputeLoss or a trainer of "
                               "amid.integrations.trl)")
        self.schedule.step(loss, state.global_step, max(state.max_steps, 1))
        setattr(self.loss_fn, self.attribute, float(self.schedule.value))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["amid_lambda"] = float(self.schedule.value)

    def on_save(self, args, state, control, **kwargs):
        _write_state(args, state, "lambda_schedule", self.schedule.state_dict())

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restore the schedule saved in ``checkpoint_dir`` (call before ``trainer.train(resume_from_checkpoint=...)``)."""
        st = _read_state(checkpoint_dir).get("lambda_schedule")
        if st is not None:
            self.schedule.load_state_dict(st)
            setattr(self.loss_fn, self.attribute, float(self.schedule.value))


class AdaptiveSGOCallback(TrainerCallback):
    """DistiLLM's adaptive student-generation controller (:class:`amid.distill.AdaptiveSGO`) as a callback.

    After each evaluation, ``sgo.observe(metrics["eval_loss"])`` (the threshold θ rises by 0.1
    when the validation loss stops improving). Before each optimizer step, ``target.<attribute>`` is
    set to θ·ratio(step), the probability of training on fresh student generations (θ for the
    ``constant`` ratio's 0.5 factor etc., as in :meth:`AdaptiveSGO.sample_threshold`). With TRL's
    ``GKDTrainer`` (or :class:`amid.integrations.trl.AMiDGKDTrainer`) the target is the trainer
    and the attribute ``lmbda``, its per-step on-policy probability (GKD has no replay buffer: the
    replay share of ``amid-distill`` is not reproduced). Logs ``amid_sgo_threshold``.
    """

    def __init__(self, sgo, target: Any = None, attribute: str = "lmbda", metric: str = "eval_loss") -> None:
        self.sgo, self.target, self.attribute, self.metric = sgo, target, attribute, metric

    def _set(self, state):
        if self.target is not None:
            p = self.sgo.sample_threshold(state.global_step, max(state.max_steps, 1))
            setattr(self.target, self.attribute, float(p))

    def on_train_begin(self, args, state, control, **kwargs):
        self._set(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set(state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and self.metric in metrics:
            self.sgo.observe(float(metrics[self.metric]))
            self._set(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["amid_sgo_threshold"] = float(self.sgo.threshold)

    def on_save(self, args, state, control, **kwargs):
        st = self.sgo.state_dict()  # its RNG only serves amid-distill's own draw: not saved here
        _write_state(args, state, "adaptive_sgo", {k: st[k] for k in ("threshold", "ref_loss", "counts")})

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        st = _read_state(checkpoint_dir).get("adaptive_sgo")
        if st is not None:
            self.sgo.threshold = float(st["threshold"])
            self.sgo.ref_loss = st["ref_loss"]
            self.sgo.counts = dict(st["counts"])
