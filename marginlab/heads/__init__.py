"""Margin heads: one file per head, all on ``MarginHead`` (see base.py for the contract).

Every head class is re-exported here, under its class name and under its paper's name, for use in your
own training loop (``from marginlab.heads import ArcFace``; with ``marginlab.losses.MarginLoss``).
What a head offers the geometry probe is declared in probe.py; what a training forward returns in output.py.
"""

from marginlab.heads.adacos import AdaCosHead
from marginlab.heads.adaface import AdaFaceHead
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.base import CosineMarginHead, MarginHead
from marginlab.heads.combined import CombinedMarginHead
from marginlab.heads.curricularface import CurricularFaceHead
from marginlab.heads.elasticface import ElasticFaceHead
from marginlab.heads.l2softmax import L2SoftmaxHead
from marginlab.heads.lsoftmax import LSoftmaxHead
from marginlab.heads.magface import MagFaceHead
from marginlab.heads.normface import NormFaceHead
from marginlab.heads.proxy_anchor import ProxyAnchorHead
from marginlab.heads.proxy_nca import ProxyNCAHead
from marginlab.heads.rbf import RBFHead
from marginlab.heads.sface import SFaceHead
from marginlab.heads.softmax import SoftmaxHead
from marginlab.heads.softtriple import SoftTripleHead
from marginlab.heads.sphereface import SphereFaceHead
from marginlab.heads.sphereface2 import SphereFace2Head
from marginlab.heads.spherefacer import SphereFaceRHead
from marginlab.heads.subcenter_arcface import SubCenterArcFaceHead
from marginlab.heads.uniface import UniFaceHead
from marginlab.heads.x2softmax import X2SoftmaxHead

# the papers' names (CosFace and AM-Softmax are one formula, configs/head/cosface.yaml)
AdaCos = AdaCosHead
AdaFace = AdaFaceHead
AMSoftmax = CosFace = AMSoftmaxHead
ArcFace = ArcFaceHead
CombinedMargin = CombinedMarginHead
CurricularFace = CurricularFaceHead
ElasticFace = ElasticFaceHead
L2Softmax = L2SoftmaxHead
LSoftmax = LSoftmaxHead
MagFace = MagFaceHead
NormFace = NormFaceHead
ProxyAnchor = ProxyAnchorHead
ProxyNCA = ProxyNCAHead
RBFSoftmax = RBFHead
SFace = SFaceHead
Softmax = SoftmaxHead
SoftTriple = SoftTripleHead
SphereFace = SphereFaceHead
SphereFace2 = SphereFace2Head
SphereFaceR = SphereFaceRHead
SubCenterArcFace = SubCenterArcFaceHead
UniFace = UniFaceHead
X2Softmax = X2SoftmaxHead

__all__ = [
    "AMSoftmax",
    "AMSoftmaxHead",
    "AdaCos",
    "AdaCosHead",
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
    "ElasticFace",
    "ElasticFaceHead",
    "L2Softmax",
    "L2SoftmaxHead",
    "LSoftmax",
    "LSoftmaxHead",
    "MagFace",
    "MagFaceHead",
    "MarginHead",
    "NormFace",
    "NormFaceHead",
    "ProxyAnchor",
    "ProxyAnchorHead",
    "ProxyNCA",
    "ProxyNCAHead",
    "RBFHead",
    "RBFSoftmax",
    "SFace",
    "SFaceHead",
    "Softmax",
    "SoftTriple",
    "SoftTripleHead",
    "SoftmaxHead",
    "SphereFace",
    "SphereFaceHead",
    "SphereFace2",
    "SphereFace2Head",
    "SphereFaceR",
    "SphereFaceRHead",
    "SubCenterArcFace",
    "SubCenterArcFaceHead",
    "UniFace",
    "UniFaceHead",
    "X2Softmax",
    "X2SoftmaxHead",
]
