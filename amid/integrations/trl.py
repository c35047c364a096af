"""TRL's distillation trainers with amid's loss: keep TRL's generation (vLLM included), PEFT,
DeepSpeed / FSDP, trackers and Hub loading; swap the generalized JSD for any AMiD setting.

    from amid.integrations.trl import AMiDGKDConfig, AMiDGKDTrainer
    args = AMiDGKDConfig(output_dir="out", lmbda=0.5, amid_alpha=0.5, amid_lam=0.1, amid_divergence="ab")
    trainer = AMiDGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                             processing_class=tokenizer)

- :class:`AMiDGKDTrainer` / :class:`AMiDGKDConfig`: TRL's ``GKDTrainer`` (on-policy share ``lmbda``,
  ``seq_kd``, sampling ``temperature``) with the loss ``amid_kd_weight·AMiD + (1 − amid_kd_weight)·CE``
  on the completion tokens (``labels != -100``), normalised by ``num_items_in_batch``.
- :class:`AMiDDistillationTrainer` / :class:`AMiDDistillationConfig`: TRL's stable
  ``DistillationTrainer`` (fully on-policy, generation buffer, vLLM) with its chunked JSD replaced
  by :func:`amid.fused_linear_amid_loss` on the hidden states and LM heads (no [tokens × vocab]
  logits). Its ``temperature`` stays the sampling temperature; the loss has its own
  ``amid_temperature``. Its ``entropy`` metric is not computed (logged as NaN).

Every AMiD option is a config field with the ``amid_`` prefix (``amid_alpha``, ``amid_lam``,
``amid_divergence``, ``amid_order``, ``amid_ab_alpha``, ``amid_ab_beta``, ``amid_temperature``,
``amid_scale_by_t2``, ``amid_detach_assistant``, ``amid_kd_weight``, ``amid_vocab_size``,
``amid_fused_linear``, ``amid_chunk_size``). ``trainer.lam`` is the live λ: drive it with
:class:`amid.integrations.hf.LambdaScheduleCallback` (TAID's schedule included; pass the trainer as
the loss object) and the GKD ``lmbda`` with :class:`amid.integrations.hf.AdaptiveSGOCallback`.
After each training micro-batch ``trainer.amid_last`` holds ``{"loss", "kd", "ce"}``; the trainer
logs their means as ``amid_kd`` / ``amid_ce``.

Tested with trl 1.16.0 (the ``integrations`` extra pins it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

try:
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("amid.integrations.trl needs TRL: pip install 'trl==1.16.0'") from e

from .. import functional as _amid
from ..fused_linear import fused_linear_amid_loss
from .hf import amid_kd_loss

__all__ = ["AMiDGKDConfig", "AMiDGKDTrainer", "AMiDDistillationConfig", "AMiDDistillationTrainer"]


@dataclass
class _AMiDFields:
    amid_alpha: float = field(default=_amid.DEFAULT_ALPHA, metadata={"help": "α of the AMiD mixture (any real)."})
    amid_lam: float = field(default=_amid.DEFAULT_LAM, metadata={"help": "λ ∈ [0, 1], the teacher's weight in r."})
    amid_divergence: str = field(default="kl", metadata={"help": "'kl' or 'ab'."})
    amid_order: str = field(default="pr", metadata={"help": "'pr', 'qr', 'rp', 'rq' or 'jsd'."})
    amid_ab_alpha: float = field(default=0.2, metadata={"help": "α-β divergence a."})
    amid_ab_beta: float = field(default=0.7, metadata={"help": "α-β divergence b."})
    amid_temperature: float = field(default=1.0, metadata={"help": "Loss temperature (sampling has its own)."})
    amid_scale_by_t2: bool = field(default=False, metadata={"help": "Multiply the loss by T²."})
    amid_detach_assistant: bool = field(default=False, metadata={"help": "TAID's stop-gradient (qr / rq)."})
    amid_kd_weight: float = field(default=1.0, metadata={"help": "Weight of AMiD; 1 − it weighs the CE."})
    amid_vocab_size: Optional[int] = field(default=None, metadata={"help": "Compare only this many vocab entries."})
    amid_fused_linear: bool = field(default=True, metadata={
        "help": "Use amid.fused_linear_amid_loss on hidden states and LM heads when the models allow it."})
    amid_chunk_size: Optional[int] = field(default=None, metadata={"help": "Token rows per fused chunk."})


def _options(args, lam: float) -> Dict[str, Any]:
    return dict(alpha=args.amid_alpha, lam=lam, divergence=args.amid_divergence, order=args.amid_order,
                ab_alpha=args.amid_ab_alpha, ab_beta=args.amid_ab_beta, temperature=args.amid_temperature,
                scale_by_t2=args.amid_scale_by_t2, detach_assistant=args.amid_detach_assistant)


def _check_args(args) -> None:
    if not 0.0 <= float(args.amid_kd_weight) <= 1.0:
        raise ValueError(f"amid.integrations.trl: expected amid_kd_weight in [0, 1], but got {args.amid_kd_weight}")


def _plain_causal_lm(model: nn.Module) -> Optional[nn.Module]:
    """The transformers causal LM inside ``model`` (PEFT unwrapped), when its logits are exactly
    ``lm_head(last_hidden_state)`` (no logit scale or soft-capping, a plain Linear head); else None."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or getattr(model, "base_model", model) is model:
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        v = getattr(cfg, name, None)
        if v is not None and not (name != "final_logit_softcapping" and float(v) == 1.0):
            return None
    return model


class _AMiDLossMixin:
    """The shared bookkeeping: the live λ, per-step loss for schedules, kd / ce logging."""

    def _amid_init(self) -> None:
        _check_args(self.args)
        self.lam = float(self.args.amid_lam)
        self.amid_last: Dict[str, Optional[Tensor]] = {}
        self._amid_step_sum: Optional[Tensor] = None
        self._amid_logs: Dict[str, list] = {"amid_kd": [], "amid_ce": []}

    def _amid_record(self, out: Dict[str, Optional[Tensor]]) -> None:
        self.amid_last = out
        if torch.is_grad_enabled():
            v = out["loss"].detach()
            self._amid_step_sum = v if self._amid_step_sum is None else self._amid_step_sum + v
            for k in ("kd", "ce"):
                if out[k] is not None:
                    self._amid_logs["amid_" + k].append(out[k])

    def pop_step_loss(self, read: bool = True) -> Optional[float]:
        """The last optimizer step's loss (its micro-batches are normalised by the whole batch, so
        their sum), for :class:`amid.integrations.hf.LambdaScheduleCallback`; resets it."""
        v = None if (self._amid_step_sum is None or not read) else float(self._amid_step_sum)
        self._amid_step_sum = None
        return v

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        for k, vals in self._amid_logs.items():
            if vals:
                logs[k] = float(torch.stack(vals).float().mean())
                vals.clear()
        logs.setdefault("amid_lambda", float(self.lam))
        super().log(logs, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# GKD

@dataclass
class AMiDGKDConfig(_AMiDFields, GKDConfig):
    """:class:`trl.experimental.gkd.GKDConfig` plus the ``amid_*`` loss options (``beta`` is unused)."""


class AMiDGKDTrainer(_AMiDLossMixin, GKDTrainer):
    """TRL's ``GKDTrainer`` with amid's loss (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._amid_init()

    def _hidden(self, model: nn.Module, inputs) -> Optional[Tensor]:
        base = _plain_causal_lm(model)
        if base is None:
            return None
        return base.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               use_cache=False).last_hidden_state

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        opts = _options(self.args, self.lam)
        unwrapped = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        s_base, t_base = _plain_causal_lm(unwrapped), _plain_causal_lm(teacher)
        norm = num_items_in_batch
        # The fused path calls the backbone directly: only when the model is not wrapped (DDP & co. need
        # their own forward to synchronise gradients; then the logits path below is used).
        if self.args.amid_fused_linear and s_base is not None and t_base is not None and not return_outputs \
                and model is unwrapped:
            hs = self._hidden(unwrapped, inputs)[:, :-1]
            self.teacher_model.eval()
            with torch.no_grad():
                ht = self._hidden(teacher, inputs)[:, :-1]
            s_head, t_head = s_base.get_output_embeddings(), t_base.get_output_embeddings()
            if isinstance(norm, Tensor):
                norm = norm.to(hs.device)
            kw = self.args.amid_kd_weight
            total, kd, ce, _z = fused_linear_amid_loss(
                hs, s_head.weight, ht.to(hs.device), t_head.weight.detach().to(hs.device), labels,
                student_bias=s_head.bias,
                teacher_bias=None if t_head.bias is None else t_head.bias.detach().to(hs.device),
                kd_weight=kw, ce_weight=1.0 - kw, normalizer=norm, vocab_size=self.args.amid_vocab_size,
                chunk_size=self.args.amid_chunk_size, return_components=True, **opts)
            self._amid_record({"loss": total, "kd": kd if kw != 0 else None, "ce": ce if kw != 1 else None})
            return total
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            t_logits = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        out = amid_kd_loss(outputs.logits, t_logits.to(outputs.logits.dtype), inputs["labels"],
                           kd_weight=self.args.amid_kd_weight, num_items_in_batch=norm,
                           vocab_size=self.args.amid_vocab_size, **opts)
        self._amid_record(out)
        return (out["loss"], outputs) if return_outputs else out["loss"]


# ------------------------------------------------------------------------------------------------
# DistillationTrainer (stable)

@dataclass
class AMiDDistillationConfig(_AMiDFields, DistillationConfig):
    """:class:`trl.DistillationConfig` plus the ``amid_*`` loss options (``beta`` is unused; its
    ``temperature`` is the sampling temperature only)."""


class AMiDDistillationTrainer(_AMiDLossMixin, DistillationTrainer):
    """TRL's ``DistillationTrainer`` with :func:`amid.fused_linear_amid_loss` as the loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._amid_init()

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_mask = inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        for who, m in (("student", unwrapped_student), ("teacher", unwrapped_teacher)):
            if _plain_causal_lm(m) is None:
                raise ValueError(f"amid.integrations.trl.AMiDDistillationTrainer: expected the {who}'s logits to be "
                                 "lm_head(last hidden state) (a plain Linear head, no logit scale or soft-capping), "
                                 "which the fused AMiD loss models, but they are not")
        hs = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep)
        self.teacher_model.eval()
        with torch.no_grad():
            ht = self._forward_redirection(self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                                           unwrapped_teacher, input_ids, attention_mask, logits_to_keep)
        s_head = _plain_causal_lm(unwrapped_student).get_output_embeddings()
        t_head = _plain_causal_lm(unwrapped_teacher).get_output_embeddings()
        dev = s_head.weight.device
        labels = inputs["completion_ids"].to(dev).masked_fill(loss_mask.to(dev) == 0, -100)
        norm = num_items_in_batch.to(dev) if isinstance(num_items_in_batch, Tensor) else num_items_in_batch
        kw = self.args.amid_kd_weight
        total, kd, ce, _z = fused_linear_amid_loss(
            hs.to(dev), s_head.weight, ht.to(dev), t_head.weight.detach().to(dev), labels, student_bias=s_head.bias,
            teacher_bias=None if t_head.bias is None else t_head.bias.detach().to(dev), kd_weight=kw,
            ce_weight=1.0 - kw,
            normalizer=norm, vocab_size=self.args.amid_vocab_size, chunk_size=self.args.amid_chunk_size,
            return_components=True, **_options(self.args, self.lam))
        self._amid_record({"loss": total, "kd": kd if kw != 0 else None, "ce": ce if kw != 1 else None})
        n_valid = (labels != -100).sum()
        return total, torch.full((), float("nan"), device=dev), n_valid
