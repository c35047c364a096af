"""amid: fused, memory-efficient AMiD (α-mixture assistant distribution) distillation losses.

    loss = amid.amid_loss(student_logits, teacher_logits, labels, alpha=0.5, lam=0.1, divergence="ab", order="pr")

See the README for the API table; ``torch.ops.amid.*`` are the underlying ops.
"""
__version__ = "0.1.0"

from . import _library

_library.load()

from . import ops  # noqa: E402  (registers fake kernels and autograd; needs the library loaded)
from . import reference  # noqa: E402
from ._library import build_info, cuda_kernels_available  # noqa: E402
from .functional import (  # noqa: E402
    ab_divergence, amid_loss, forward_kl, generalized_jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, taid_loss)
from .nn import AMiDLoss  # noqa: E402
from .fused_linear import (  # noqa: E402
    FusedLinearAMiDLoss, FusedLinearGeneralizedJSD, fused_linear_amid_loss, fused_linear_generalized_jsd)
from .topk import amid_loss_topk  # noqa: E402
from . import parallel  # noqa: E402  (vocab-parallel AMiD: amid.parallel.vocab_parallel_amid_loss)

__all__ = [
    "amid_loss", "AMiDLoss", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd",
    "taid_loss", "ab_divergence", "fused_linear_amid_loss", "FusedLinearAMiDLoss", "fused_linear_generalized_jsd",
    "FusedLinearGeneralizedJSD", "amid_loss_topk", "build_info",
    "cuda_kernels_available", "ops", "parallel", "reference", "__version__",
]
