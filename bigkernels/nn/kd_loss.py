"""``bigkernels.nn.KDLoss``: the module form of :func:`bigkernels.nn.functional.kd_loss`."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from bigkernels.nn import functional as F


class KDLoss(nn.Module):
    """Knowledge-distillation loss ``(1 − alpha) · T² · KL(softmax(teacher/T) ‖ softmax(student/T))
    + alpha · CE(student, labels)``, averaged over the rows that count (``reduction="batchmean"``).

    ``forward(student_logits, teacher_logits, labels=None)``; logits ``(N, V)`` or ``(B, T, V)``.
    See :func:`bigkernels.nn.functional.kd_loss` for every argument. Typical use::

        loss_fn = bk.nn.KDLoss(temperature=2.0, ignore_index=-100, alpha=0.5)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = loss_fn(student(x), teacher_logits, labels)
    """

    def __init__(self, temperature: float = 1.0, ignore_index: Optional[int] = None, alpha: float = 0.0,
                 reduction: str = "batchmean"):
        super().__init__()
        # labels are only known at forward time: validate the rest now, with a stand-in for them
        F.check_options("KDLoss", temperature, alpha, ignore_index, reduction, labels=True)
        self.temperature, self.ignore_index, self.alpha, self.reduction = temperature, ignore_index, alpha, reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return F.kd_loss(student_logits, teacher_logits, temperature=self.temperature, reduction=self.reduction,
                         ignore_index=self.ignore_index, labels=labels, alpha=self.alpha)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, alpha={self.alpha}, "
                f"reduction={self.reduction!r}")
