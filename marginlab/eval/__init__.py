"""Evaluation: face verification (``verification``: the protocol; ``verification_sets``: .bin / raw LFW)."""

from marginlab.eval.verification import embed_images, embed_pairs, evaluate, evaluate_distances
from marginlab.eval.verification_sets import (
    VerificationSet,
    VerificationTarget,
    load_bin,
    load_lfw_folder,
    load_verification_set,
)

__all__ = [
    "VerificationSet",
    "VerificationTarget",
    "embed_images",
    "embed_pairs",
    "evaluate",
    "evaluate_distances",
    "load_bin",
    "load_lfw_folder",
    "load_verification_set",
]
