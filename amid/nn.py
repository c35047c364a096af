"""``nn.Module`` wrappers: they hold the loss options and call :mod:`amid.functional`."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from . import functional as F

__all__ = ["AMiDLoss"]


class AMiDLoss(nn.Module):
    r"""Module form of :func:`amid.amid_loss` (see there for the math and every option).

    ``forward(student_logits, teacher_logits, labels=None, normalizer=None, num_items_in_batch=None)``:
    student first, teacher second, logits ``[..., V]``, labels ``[...]``. Built with no arguments it
    uses α = 0.5, λ = 0.1, KL(p‖r) (see :func:`amid.amid_loss` for where these defaults come from).
    ``vocab_size=`` cuts both logits to the shared real vocabulary. ``lam`` and ``alpha`` are plain
    attributes, so a schedule can update them between steps (``loss_fn.lam = schedule.value``).

    Example::

        loss_fn = amid.AMiDLoss(alpha=0.5, lam=0.1, divergence="ab", order="pr")
        loss = loss_fn(student_logits, teacher_logits.detach(), labels)
    """

    def __init__(self, alpha: float = F.DEFAULT_ALPHA, lam: float = F.DEFAULT_LAM, divergence: str = "kl",
                 order: str = "pr", *,
                 ab_alpha: float = 0.2, ab_beta: float = 0.7, temperature: float = 1.0, scale_by_t2: bool = False,
                 detach_assistant: bool = False, ignore_index: int = -100, reduction: str = "mean",
                 grad_in_forward: Optional[bool] = None, backend: str = "auto",
                 vocab_size: Optional[int] = None) -> None:
        super().__init__()
        fn = "AMiDLoss"
        self.alpha, self.lam = F._real(fn, "alpha", alpha), F._real(fn, "lam", lam)
        self.divergence, self.order = divergence, order
        self.ab_alpha, self.ab_beta = F._real(fn, "ab_alpha", ab_alpha), F._real(fn, "ab_beta", ab_beta)
        self.temperature, self.scale_by_t2 = F._real(fn, "temperature", temperature), bool(scale_by_t2)
        self.detach_assistant = bool(detach_assistant)
        self.ignore_index, self.reduction = F._integer(fn, "ignore_index", ignore_index), reduction
        self.grad_in_forward, self.backend = grad_in_forward, backend
        self.vocab_size = vocab_size

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                normalizer: Optional[Union[float, Tensor]] = None,
                num_items_in_batch: Optional[Union[float, Tensor]] = None) -> Tensor:
        return F.amid_loss(student_logits, teacher_logits, labels, alpha=self.alpha, lam=self.lam,
                           divergence=self.divergence, order=self.order, ab_alpha=self.ab_alpha,
                           ab_beta=self.ab_beta, temperature=self.temperature, scale_by_t2=self.scale_by_t2,
                           detach_assistant=self.detach_assistant, ignore_index=self.ignore_index,
                           reduction=self.reduction, normalizer=normalizer, grad_in_forward=self.grad_in_forward,
                           backend=self.backend, num_items_in_batch=num_items_in_batch,
                           vocab_size=self.vocab_size, _fn="AMiDLoss")

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, lam={self.lam}, divergence='{self.divergence}', order='{self.order}', "
                f"temperature={self.temperature}, reduction='{self.reduction}'")
