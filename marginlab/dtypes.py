"""The float-precision rule shared by heads, regularizers and Partial FC: margin and loss arithmetic
runs in float32 at least, even under autocast; float64 stays float64 (gradcheck)."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """Promotes half/bfloat16 to float32 and keeps float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
