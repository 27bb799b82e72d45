"""Before training: can C class directions in d dimensions satisfy the head's margin at all?

The bound is the best spherical code alpha*(C, d); the margin holds in a cap of radius rho around each class
direction (infeasible: rho = 0; tight: rho < TIGHT_SHARE * alpha/2). The derivation, with its sources, and what
the check does not cover: docs/training.md, "How the margin check decides".
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from marginlab.errors import ConfigError

log = logging.getLogger(__name__)

TIGHT_SHARE = 0.25  # a margin leaving less than this share of the margin-free cap radius alpha/2 is "tight"
MAX_NUMERIC_CLASSES = 200  # above: the Gilbert-Varshamov bound instead of the numerical estimate
GRID = 4001  # theta samples in [0, alpha/2] for the cap radius rho


@dataclass(frozen=True)
class CodeAngle:
    """alpha*(C, d) in degrees as used (``deg``), how it was obtained, and an upper bound on it."""

    deg: float
    how: str
    upper_deg: float


@functools.lru_cache(maxsize=32)
def _cap_table(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha on [0, pi], cap_fraction(alpha)) on a fine grid, for one dim >= 2."""
    # area of a spherical cap: integral_0^alpha sin^(d-2) t dt over integral_0^pi (e.g. Rankin 1955, sec. 2)
    t = np.linspace(0.0, math.pi, 100001)
    density = np.sin(t) ** (dim - 2)
    cum = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    return t, cum / cum[-1]


def cap_fraction(alpha: float, dim: int) -> float:
    """The share of S^(dim-1) within angle ``alpha`` (rad) of a point, for dim >= 2."""
    t, frac = _cap_table(dim)
    return float(np.interp(alpha, t, frac))


def _largest_angle_with_fraction(limit: float, dim: int) -> float:
    """The largest alpha (rad) with cap_fraction(alpha, dim) <= limit (the table's last grid point below it)."""
    t, frac = _cap_table(dim)
    return float(t[max(int(np.searchsorted(frac, limit, side="right")) - 1, 0)])


def packing_upper_bound(num_classes: int, dim: int) -> float:
    """Degrees: C caps of radius alpha/2 around the code's points are disjoint, so C frac(alpha/2) <= 1."""
    bound = 2 * _largest_angle_with_fraction(1.0 / num_classes, dim)
    if num_classes >= dim + 2:
        bound = min(bound, math.pi / 2)  # Rankin 1955: at most 90 deg for C >= d + 2 points
    return math.degrees(bound)


def gilbert_varshamov(num_classes: int, dim: int) -> float:
    """Degrees: a greedy code stops only once its caps of radius alpha cover the sphere, so a code of C
    points with min angle alpha exists while C frac(alpha) <= 1 (Gilbert-Varshamov on the sphere)."""
    return math.degrees(_largest_angle_with_fraction(1.0 / num_classes, dim))


@functools.lru_cache(maxsize=64)
def numeric_code(num_classes: int, dim: int, steps: int = 600, restarts: int = 8, seed: int = 0) -> float:
    """Degrees: the min angle of the best of ``restarts`` seeded codes found by repulsion (a lower bound)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(
        torch.randn(restarts, num_classes, dim, generator=gen, dtype=torch.float64), dim=2
    )
    eye = torch.eye(num_classes, dtype=torch.bool)
    for i in range(steps):
        temp = 5.0 * 2000.0 ** (i / (steps - 1))  # the soft maximum sharpens from 5 to 1e4
        gram = (x @ x.transpose(1, 2)).masked_fill(eye, -2.0)
        weights = torch.softmax(temp * gram.flatten(1), dim=1).view_as(gram)
        grad = 2 * weights @ x  # d/dx of logsumexp(temp * cos_ij) / temp (the weights are symmetric)
        grad = grad - (grad * x).sum(2, keepdim=True) * x  # tangent to the sphere
        size = 0.2 * 0.01 ** (i / (steps - 1))  # the step shrinks from 0.2 to 0.002 rad
        x = torch.nn.functional.normalize(
            x - size * grad / grad.norm(dim=2, keepdim=True).amax(1, keepdim=True).clamp_min(1e-12), dim=2
        )
    gram = (x @ x.transpose(1, 2)).masked_fill(eye, -2.0)
    return math.degrees(math.acos(min(1.0, gram.flatten(1).amax(1).min().item())))


@functools.lru_cache(maxsize=256)
def best_code_angle(num_classes: int, dim: int) -> CodeAngle:
    """alpha*(C, d): exact where known, else a numerical estimate or the Gilbert-Varshamov bound."""
    c, d = int(num_classes), int(dim)
    if c < 2 or d < 1:
        raise ConfigError(f"num_classes={c}, embedding_dim={d}: the margin check needs >= 2 classes and dim >= 1")
    if d == 1:
        deg = 180.0 if c == 2 else 0.0
        return CodeAngle(deg, "exact (a line has two directions)", deg)
    if d == 2:
        return CodeAngle(360.0 / c, "exact (regular polygon, 360/C)", 360.0 / c)
    if c <= d + 1:
        deg = math.degrees(math.acos(-1.0 / (c - 1)))
        return CodeAngle(deg, "exact (regular simplex, arccos(-1/(C-1)))", deg)
    if c <= 2 * d:  # Rankin 1955: no C >= d + 2 points do better; the cross-polytope attains it
        return CodeAngle(90.0, "exact (Rankin: 90 deg for d+2 <= C <= 2d)", 90.0)
    upper = packing_upper_bound(c, d)  # both below are codes that exist: lower bounds on alpha*
    if c <= MAX_NUMERIC_CLASSES:
        return CodeAngle(numeric_code(c, d), "numerical estimate (repulsion, a code that exists)", upper)
    return CodeAngle(gilbert_varshamov(c, d), "Gilbert-Varshamov lower bound", upper)


def has_margin(head) -> bool:
    """Whether the head enforces a margin (its ``probe_margin``, heads/probe.py) on directions."""
    from marginlab.heads.probe import probe_margin

    if getattr(head, "weights_are_points", False):
        return False  # RBF-Softmax: prototypes are points, not directions
    return probe_margin(head).enforced


@torch.no_grad()
def cap_radius(head, alpha_deg: float) -> float:
    """rho (degrees): the largest theta with no margin violation at (cos theta, cos(alpha - theta)), theta from 0."""
    from marginlab.heads.probe import probe_margin

    alpha = math.radians(alpha_deg)
    # the worst case: the feature moved towards the nearest class, which is then alpha - theta away (triangle
    # inequality: every other class is at least that far)
    theta = torch.linspace(0.0, alpha / 2, GRID, dtype=torch.float64)
    bad = probe_margin(head).violation(torch.cos(theta), torch.cos(alpha - theta))
    first = int(torch.nonzero(bad)[0]) if bool(bad.any()) else GRID
    return 0.0 if first == 0 else math.degrees(theta[first - 1].item())


def needed_angle(head, share: float) -> float:
    """Degrees: the smallest code angle alpha with cap radius >= share * alpha/2 (bisection; 180 if none)."""

    def fits(a):
        rho = cap_radius(head, a)
        return rho > 0 and rho >= share * a / 2

    if not fits(180.0):
        return 180.0
    lo, hi = 0.0, 180.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def loss_floor(head, alpha_deg: float) -> float | None:
    """Nats: the cross-entropy of a feature at its class direction with the nearest class at alpha, the
    smallest any sample can reach at the best code; None for heads without ``margin_and_slope`` and ``s``."""
    if not hasattr(head, "margin_and_slope") or not isinstance(getattr(head, "s", None), (int, float)):
        return None
    try:
        with torch.no_grad():
            psi0 = float(head.margin_and_slope(torch.ones(1, dtype=torch.float64))[0].reshape(-1)[0])
    except NotImplementedError:  # heads that make their target logit elsewhere (AdaFace: per-sample norms)
        return None
    # softmax cross-entropy, target logit s psi(1), one other logit s cos alpha: log(1 + e^(s (cos a - psi)))
    z = head.s * (math.cos(math.radians(alpha_deg)) - psi0)
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


@dataclass(frozen=True)
class MarginAdvice:
    """The verdict (ok / tight / infeasible) with the numbers behind it and a one-paragraph message."""

    verdict: str
    num_classes: int
    dim: int
    code: CodeAngle
    cap_deg: float
    needed_deg: float
    message: str


def advise(head, num_classes: int | None = None, dim: int | None = None) -> MarginAdvice | None:
    """The margin check of ``head`` for C classes in d dimensions (default: the head's own); None without a margin."""
    if not has_margin(head):
        return None
    c = int(num_classes if num_classes is not None else head.num_classes)
    d = int(dim if dim is not None else head.in_features)
    if c < 2:
        return None
    code = best_code_angle(c, d)
    rho = cap_radius(head, code.deg)
    free = code.deg / 2
    verdict = "infeasible" if rho <= 0 else ("tight" if rho < TIGHT_SHARE * free else "ok")
    needed = needed_angle(head, TIGHT_SHARE)
    head_name = type(head).__name__
    text = (
        f"{head_name} with {c} classes in {d} dimensions: the class directions can be at most "
        f"{code.deg:.2f} deg apart ({code.how}; upper bound {code.upper_deg:.2f} deg); "
    )
    if verdict == "infeasible":
        text += "even a feature exactly at its class direction violates the margin"
        floor = loss_floor(head, code.deg)
        if floor is not None:
            text += f", so no sample's loss can fall below {floor:.3g} nats at s={head.s:g}"
    else:
        text += (
            f"the margin holds within {rho:.2f} deg of each class direction, "
            f"{rho / free:.0%} of the {free:.2f} deg a margin-free head has"
        )
    text += "."
    if verdict != "ok":
        text += (
            f" To leave each class a quarter of its margin-free cap the margin needs the classes {needed:.2f} deg"
            " apart. Use a smaller margin m"
        )
        if needed < 180.0:
            text += f" or a larger backbone.embedding_dim (>= {suggest_dim(c, needed)} gives {c} classes enough room)"
        text += "."
    return MarginAdvice(verdict, c, d, code, rho, needed, text)


def suggest_dim(num_classes: int, needed_deg: float) -> int:
    """The smallest embedding dim whose exactly known code angle for C classes reaches ``needed_deg``."""
    if num_classes > 2 and 360.0 / num_classes >= needed_deg:
        return 2
    if needed_deg <= 90.0:
        return math.ceil(num_classes / 2)  # Rankin: 90 deg for C <= 2d
    return num_classes - 1  # the simplex, arccos(-1/(C-1)) > 90 deg


def check_margin(head, strict: bool) -> MarginAdvice | None:
    """Logs a warning for a tight or infeasible margin; with ``strict`` (trainer.strict_margin) it is a ConfigError."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~80 ops on 4,001-point grids: on a busy CPU the thread pool made them ~1 s (#16)
    try:
        advice = advise(head)
    finally:
        torch.set_num_threads(threads)
    if advice is None or advice.verdict == "ok":
        return advice
    if strict:
        raise ConfigError(
            f"trainer.strict_margin=true refuses this margin ({advice.verdict}): {advice.message} "
            "(trainer.strict_margin=false only warns)"
        )
    log.warning("margin %s: %s", advice.verdict, advice.message)
    return advice
