"""Margin heads: one file per head, all on ``MarginHead`` (see base.py for the contract).

Every head class is re-exported here, under its class name and under its paper's name, for use in your
own training loop (``from marginlab.heads import ArcFace``; with ``marginlab.losses.MarginLoss``).
What a head offers the geometry probe is declared in probe.py; what a training forward returns in output.py.
"""

from marginlab.heads.adaface import AdaFaceHead
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.base import CosineMarginHead, MarginHead
from marginlab.heads.combined import CombinedMarginHead
from marginlab.heads.curricularface import CurricularFaceHead
from marginlab.heads.l2softmax import L2SoftmaxHead
from marginlab.heads.lsoftmax import LSoftmaxHead
from marginlab.heads.magface import MagFaceHead
from marginlab.heads.normface import NormFaceHead
from marginlab.heads.rbf import RBFHead
from marginlab.heads.softmax import SoftmaxHead
from marginlab.heads.sphereface import SphereFaceHead
from marginlab.heads.subcenter_arcface import SubCenterArcFaceHead

# the papers' names (CosFace and AM-Softmax are one formula, configs/head/cosface.yaml)
AdaFace = AdaFaceHead
AMSoftmax = CosFace = AMSoftmaxHead
ArcFace = ArcFaceHead
CombinedMargin = CombinedMarginHead
CurricularFace = CurricularFaceHead
L2Softmax = L2SoftmaxHead
LSoftmax = LSoftmaxHead
MagFace = MagFaceHead
NormFace = NormFaceHead
RBFSoftmax = RBFHead
Softmax = SoftmaxHead
SphereFace = SphereFaceHead
SubCenterArcFace = SubCenterArcFaceHead

__all__ = [
    "AMSoftmax",
    "AMSoftmaxHead",
    "AdaFace",
    "AdaFaceHead",
    "ArcFace",
    "ArcFaceHead",
    "CombinedMargin",
    "CombinedMarginHead",
    "CosFace",
    "CosineMarginHead",
    "CurricularFace",
    "CurricularFaceHead",
    "L2Softmax",
    "L2SoftmaxHead",
    "LSoftmax",
    "LSoftmaxHead",
    "MagFace",
    "MagFaceHead",
    "MarginHead",
    "NormFace",
    "NormFaceHead",
    "RBFHead",
    "RBFSoftmax",
    "Softmax",
    "SoftmaxHead",
    "SphereFace",
    "SphereFaceHead",
    "SubCenterArcFace",
    "SubCenterArcFaceHead",
]
