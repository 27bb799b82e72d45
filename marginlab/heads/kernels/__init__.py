"""The heads' fused autograd kernels, one unit: ``fast_cosine`` (the B x C product ``x W^T``, optionally
over the class-weight norms, with a blocked hand-written backward) and ``fused_margin`` (a cosine-margin
head's whole training forward as one Function, built on fast_cosine's backward).

The heads import only the names below; everything else (``_dtypes``, ``_normalized_backward``,
``BLOCK_ELEMENTS`` ...) is private to this package. Nothing outside ``marginlab/heads`` imports it.
"""

from marginlab.heads.kernels.fast_cosine import (LazyCosine, class_block, fused_linear, no_autocast, normalize_features,
                                                 precise_cosine)
from marginlab.heads.kernels.fused_margin import fused_cosine_margin, with_slope

__all__ = ["LazyCosine", "class_block", "fused_linear", "fused_cosine_margin", "no_autocast",
           "normalize_features", "precise_cosine", "with_slope"]
