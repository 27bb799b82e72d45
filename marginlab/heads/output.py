"""What a head's training forward returns when the head is a loss of its own (the head contract, heads/base.py).

A logits head returns its B x C training logits and the criterion (marginlab/losses) applies cross-entropy. A head
that computes its loss itself (``MarginHead.produces_loss``: per-class binary cross-entropy, sigmoid-weighted terms)
returns a ``HeadLoss`` instead, and so does any training step that never builds the logits (a chunked loss). A
logits head asked for the step statistics (``stats=True``) returns ``HeadScores`` when it read them off the cosines
its forward made, so nobody computes the B x C x D product a second time for them.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class StepStats(NamedTuple):
    """The two B-vectors the probe's step statistics read (geometry/stats.py), detached: each row's target cosine
    cos theta_y and its nearest non-target cosine."""

    target: Tensor
    nearest_other: Tensor


class HeadScores(NamedTuple):
    """A logits head's training forward with ``stats=True`` when it read the step statistics off its own cosines:
    ``logits`` as without ``stats`` (bit for bit) and ``stats``, what its pure ``cosine`` would give up to the
    rounding of the forward's product (heads/probe.py, ``logit_stats``)."""

    logits: Tensor
    stats: StepStats


class HeadLoss(NamedTuple):
    """A head's training output when it is the loss itself.

    ``loss``: 0-dim, the batch's mean loss (the criterion adds regularizers and ``extra_loss``); ``predicted``: each
    row's predicted class (B, detached) for the training accuracy, None when no rank scores every class (Partial
    FC); ``stats``: the probe's step statistics when the head computed them on the way (None: the criterion asks
    the head's pure ``cosine`` on the steps that log them).
    """

    loss: Tensor
    predicted: Tensor | None = None
    stats: StepStats | None = None
