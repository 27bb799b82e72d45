"""The criterion seam for a head that is a loss of its own (``MarginHead.produces_loss``, heads/output.py): its
``HeadLoss`` is the loss (no cross-entropy on top), its predictions give the accuracy, and the head's own term and
the regularizers that read features are added; a regularizer that needs the logits is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads.base import MarginHead
from marginlab.heads.output import HeadLoss
from marginlab.losses import MarginLoss
from marginlab.regularizers.center import CenterLoss
from marginlab.regularizers.incay import FeatureIncay


class BinaryHead(MarginHead):
    """A toy loss head: one-vs-all binary cross-entropy on s cos theta (SphereFace2's shape, without its margin)."""

    produces_loss = True

    def logits(self, embeddings, labels):
        return 4.0 * self.normalized_cosine(embeddings)

    def loss(self, embeddings, labels):
        scores = self.logits(embeddings, None)
        target = F.one_hot(labels, self.num_classes).to(scores.dtype)
        return HeadLoss(F.binary_cross_entropy_with_logits(scores, target), scores.detach().argmax(1))


def test_the_head_loss_is_the_loss_and_its_predictions_the_accuracy():
    torch.manual_seed(0)
    head = BinaryHead(5, 3)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    head.double()
    criterion = MarginLoss(head)
    output = head(x, y)
    assert isinstance(output, HeadLoss)
    scores = 4.0 * F.normalize(x) @ F.normalize(head.weight).T
    expected = F.binary_cross_entropy_with_logits(scores, F.one_hot(y, 3).double())
    torch.testing.assert_close(criterion(x, y), expected.float(), rtol=0, atol=1e-7)
    step = criterion.step(x, output, y, stats=True)
    torch.testing.assert_close(step.predicted, scores.argmax(1))
    cos = F.normalize(x) @ F.normalize(head.weight).T  # no statistics of its own: from its pure cosine
    torch.testing.assert_close(step.stats.target, cos.gather(1, y.view(-1, 1)).squeeze(1).float())
    assert head(x).shape == (6, 3)  # without labels: the evaluation scores


def test_a_feature_regularizer_is_added_to_the_head_loss():
    torch.manual_seed(0)
    head, center = BinaryHead(5, 3), CenterLoss(5, 3, weight=0.5)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = head(x, y).loss + copy.deepcopy(center)(x, y, None)  # (a copy: the centres move when called)
    torch.testing.assert_close(MarginLoss(head, [center])(x, y), expected)


def test_a_regularizer_that_needs_the_logits_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="regularizer 'FeatureIncay' needs the logits, which BinaryHead never"):
        MarginLoss(BinaryHead(5, 3), [FeatureIncay(5, 3)])
