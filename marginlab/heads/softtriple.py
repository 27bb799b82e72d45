"""SoftTriple (Qian et al., ICCV 2019): K centres per class, a softmax-weighted class similarity, + a centre term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.checks import check_float, check_positive_int
from marginlab.heads.base import MarginHead


class SoftTripleHead(MarginHead):
    """Logits ``la (S_ic - delta [c = y_i])``, cross-entropy applied by the criterion, with SoftTriple's relaxed
    class similarity ``S_ic = sum_k softmax_k(x^ . w^_c^k / gamma) x^ . w^_c^k`` over the class's K unit centres;
    plus ``tau R`` from ``extra_loss()``, ``R = sum_c sum_{k < k'} sqrt(2 + 1e-5 - 2 w^_c^k . w^_c^k') / (C K
    (K - 1))`` (only where tau > 0 and K > 1, as the official code adds it).

    Ported from idstcv/SoftTriple loss/SoftTriple.py (commit cc1c32d2f93acc714aebadb07c6760d0195369a3), whose
    ``fc`` is D x (C K): ``weight`` is its transpose, (C K) x D, class c's centres in rows c K .. c K + K - 1
    (so ``weight`` is not C x D unless K = 1). Defaults are its train.py's: la 20, gamma 0.1, tau 0.2, margin
    delta 0.01 (a cosine), K 10, the centres learning at 100 times the backbone's rate (``--centerlr 0.01``,
    ``--modellr 1e-4``: the config's ``lr_mult: 100``); W starts as its ``kaiming_uniform_(fc, a=sqrt(5))``,
    U(+-1/sqrt(C K)).
    The official takes the features as given (its network normalises them); here, as in pytorch-metric-learning's
    ``SoftTripleLoss`` (v2.9.0, which has no centre term), x is normalised. ``head(x)`` scores ``la S``.
    The cosine the probe and evaluation read is S (the relaxed maximum over the centres). SoftTriple's margin
    delta is on S, not on the angle: the margin advisor has no cosine margin to check.
    """

    normalized_features = True  # it classifies x / ||x||
    # idstcv/SoftTriple loss/SoftTriple.py: init.kaiming_uniform_(self.fc, a=math.sqrt(5)) on the D x (C K) fc
    official_init = "kaiming_uniform_fan_out"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        margin: float = 0.01,
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        self.centers_per_class = check_positive_int("centers_per_class", centers_per_class)
        self.la = check_float("la", la, low=0.0, low_inclusive=False)
        self.gamma = check_float("gamma", gamma, low=0.0, low_inclusive=False)
        self.tau = check_float("tau", tau, low=0.0)
        self.margin = check_float("margin", margin, low=0.0, high=1.0)
        self.weight = nn.Parameter(torch.empty(num_classes * self.centers_per_class, in_features))
        self.reset_weight()
        self._loss_reg: Tensor | None = None

    def class_similarity(self, embeddings: Tensor) -> Tensor:
        """S (B x C): each class's centre similarities weighted by their softmax at temperature gamma."""
        sim = self.normalized_cosine(embeddings).view(embeddings.shape[0], self.num_classes, self.centers_per_class)
        # SoftTriple eq. 7: S_ic = sum_k exp(s_k / gamma) / sum_k' exp(s_k' / gamma) s_k
        prob = F.softmax(sim * (1.0 / self.gamma), dim=2)
        return (prob * sim).sum(dim=2)

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        return self.class_similarity(embeddings)

    def centre_regularizer(self) -> Tensor:
        """R: the mean distance between the unit centres of each class (official: over the pairs k < k')."""
        k = self.centers_per_class
        centres = F.normalize(self.weight, dim=1).view(self.num_classes, k, -1)
        sim = centres @ centres.transpose(1, 2)  # C x K x K
        upper = torch.triu_indices(k, k, offset=1, device=sim.device)
        # SoftTriple eq. 13 (official): sum_c sum_{k < k'} sqrt(2 + 1e-5 - 2 w_c^k . w_c^k') / (C K (K - 1))
        return torch.sqrt(2.0 + 1e-5 - 2.0 * sim[:, upper[0], upper[1]]).sum() / (self.num_classes * k * (k - 1.0))

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        similarity = self.class_similarity(embeddings)
        use_reg = self.training and labels is not None and self.tau > 0 and self.centers_per_class > 1
        self._loss_reg = self.tau * self.centre_regularizer() if use_reg else None
        logits = self.la * similarity
        if labels is None:
            return logits
        # SoftTriple eq. 10: la (S_iy - delta) for the target class
        target = self.la * (similarity.gather(1, labels.view(-1, 1)).squeeze(1) - self.margin)
        return self.replace_target(logits, labels, target)

    def extra_loss(self) -> Tensor | None:
        """tau R from the last training forward; None after an evaluation forward (or with tau = 0 or K = 1)."""
        return self._loss_reg
