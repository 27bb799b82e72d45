"""The names the papers give the heads and regularizers marginlab ships (config name -> paper name): what a
figure title or a table row calls a run ("ArcFace (s=10, m=0.2)"), never the config's file name."""

from __future__ import annotations

HEADS = {
    "adacos": "AdaCos",
    "adaface": "AdaFace",
    "amsoftmax": "AM-Softmax",
    "arcface": "ArcFace",
    "coco": "COCO loss",
    "combined": "Combined margin",
    "cosface": "CosFace",
    "cosine": "Cosine softmax",
    "curricularface": "CurricularFace",
    "elasticface": "ElasticFace",
    "l2softmax": "L2-Softmax",
    "lsoftmax": "L-Softmax",
    "magface": "MagFace",
    "normface": "NormFace",
    "proxy_anchor": "Proxy-Anchor",
    "proxy_nca": "ProxyNCA",
    "rbf": "RBF-Softmax",
    "sface": "SFace",
    "softmax": "Softmax",
    "softtriple": "SoftTriple",
    "sphereface": "SphereFace",
    "sphereface2": "SphereFace2",
    "spherefacer": "SphereFace-R",
    "subcenter_arcface": "Sub-center ArcFace",
    "uniface": "UniFace",
    "x2softmax": "X2-Softmax",
}
REGULARIZERS = {"center": "center loss", "incay": "Feature Incay"}


def head_label(head: str | None, regularizer: str | None = None, params: dict | None = None) -> str:
    """``ArcFace (s=10, m=0.2)``: the paper's name of ``head`` (+ the regularizer's), then ``params``."""
    name = HEADS.get(head, head) if head and head != "null" else ""
    if regularizer and regularizer != "null":
        name += (" + " if name else "") + REGULARIZERS.get(regularizer, regularizer)
    shown = ", ".join(f"{k}={v}" for k, v in (params or {}).items())
    return f"{name} ({shown})" if name and shown else name or shown
