"""SphereFace / A-Softmax (Liu et al., CVPR 2017): L-Softmax with class weights normalised every forward."""

from __future__ import annotations

from marginlab.heads.lsoftmax import LSoftmaxHead


class SphereFaceHead(LSoftmaxHead):
    """A-Softmax: features not normalised, ``||W_j|| = 1``, no bias.

    Target logit ``||x|| (psi(theta_y) + lambda cos(theta_y)) / (1 + lambda)``, other logits
    ``||x|| cos(theta_j)``; evaluation logits ``||x|| cos(theta_j)``. psi and the lambda annealing are
    L-Softmax's (see lsoftmax.py). Defaults: the official training prototxt (wy1iu/sphereface:
    m = 4, base 1000, gamma 0.12, power 1, lambda_min 5 — lambda reaches 5 near iteration 1,658).
    m = 1 is the paper's "modified softmax" (normalised weights, no bias, no margin).
    """

    normalize_weights = True

    def __init__(self, in_features: int, num_classes: int, m: int = 4, base: float = 1000.0,
                 gamma: float = 0.12, power: float = 1.0, lambda_min: float = 5.0):
        super().__init__(in_features, num_classes, m=m, base=base, gamma=gamma, power=power,
                         lambda_min=lambda_min)
