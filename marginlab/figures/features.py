"""Scatter of 2-D / 3-D features coloured by class, with the class weight directions (LeNet++ style).

For heads that classify normalised features a second panel shows the features projected on the unit
circle (2-D) or unit sphere (3-D).
"""

from __future__ import annotations

import numpy as np

from marginlab.figures import class_colors, new_figure

MAX_DRAWN_CLASSES = 100  # weight directions drawn; beyond this only the points are drawn


def _limits(points: np.ndarray) -> float:
    radius = float(np.percentile(np.linalg.norm(points, axis=1), 99)) if len(points) else 1.0
    return radius * 1.1 if np.isfinite(radius) and radius > 0 else 1.0


def draw_features(
    ax,
    features: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    unit: bool = False,
    weights_are_points: bool = False,
    class_ids: np.ndarray | None = None,
) -> None:
    """Draws one panel on ``ax`` (a 3-D axes for 3-D features).

    ``weights`` (K x D) are the class prototypes of ``class_ids`` (default 0..K-1). They are drawn as
    directions from the origin, their length proportional to the weight norm (the longest reaches the
    cloud's edge), or, with ``weights_are_points`` (RBF prototypes), as crosses at their positions.
    ``unit`` projects features and weights on the unit circle / sphere.
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    dim = features.shape[1]
    num_classes = int(num_classes or (labels.max() + 1 if len(labels) else 1))
    if unit:
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    radius = 1.05 if unit else _limits(features)
    coords = [features[:, i] for i in range(dim)]
    ax.scatter(*coords, c=class_colors(labels, num_classes), s=6, alpha=0.6, linewidths=0, rasterized=True)
    if unit and dim == 2:
        t = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(t), np.sin(t), color="0.6", lw=0.8)
    elif unit and dim == 3:
        u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 24), np.linspace(0, np.pi, 12))
        ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.4)
    if weights is not None and len(weights):
        weights = np.asarray(weights, dtype=np.float32)[:MAX_DRAWN_CLASSES]
        ids = np.arange(len(weights)) if class_ids is None else np.asarray(class_ids)[: len(weights)]
        colors = class_colors(ids, num_classes)
        norms = np.linalg.norm(weights, axis=1, keepdims=True)
        if weights_are_points and not unit:
            ax.scatter(*[weights[:, i] for i in range(dim)], c=colors, marker="X", s=60, edgecolors="k", linewidths=0.6)
        else:
            scale = 1.0 / np.maximum(norms, 1e-12) if unit else 1.0 / max(float(norms.max()), 1e-12)
            ends = weights * scale * (1.0 if unit else radius / 1.1)
            segments = np.stack([np.zeros_like(ends), ends], axis=1)  # K x 2 x D: origin -> direction
            if dim == 2:
                from matplotlib.collections import LineCollection

                ax.add_collection(LineCollection(segments, colors=colors, linewidths=1.8))
            else:
                from mpl_toolkits.mplot3d.art3d import Line3DCollection

                ax.add_collection3d(Line3DCollection(segments, colors=colors, linewidths=1.8))
            ax.scatter(*[ends[:, i] for i in range(dim)], c=colors, s=16, edgecolors="k", linewidths=0.5)
    if dim == 2:
        ax.set_xlim(-radius, radius)
        ax.set_ylim(-radius, radius)
        ax.set_aspect("equal")
    else:
        for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            setter(-radius, radius)
        ax.set_box_aspect((1, 1, 1))
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis, *([ax.zaxis] if dim == 3 else [])):
        axis.set_major_locator(MaxNLocator(4))  # few tick labels: text is most of the drawing time
    ax.tick_params(labelsize=7)


def class_legend(fig, labels: np.ndarray, num_classes: int | None, **placement) -> None:
    """The class colours as a figure legend beside the panels (never over a panel's points); up to 10 classes."""
    labels = np.asarray(labels)
    num_classes = int(num_classes or (labels.max() + 1 if len(labels) else 1))
    if num_classes > 10 or not len(labels):
        return
    from matplotlib.lines import Line2D

    present = np.unique(labels)
    handles = [Line2D([], [], ls="", marker="o", ms=4, color=c) for c in class_colors(present, num_classes)]
    fig.legend(
        handles,
        [str(c) for c in present],
        fontsize=7,
        title="class",
        title_fontsize=7,
        frameon=False,
        handletextpad=0.1,
        borderaxespad=0.2,
        **placement,
    )


def features_figure(
    features: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    normalized: bool = False,
    title: str = "",
    num_classes: int | None = None,
    weights_are_points: bool = False,
    class_ids: np.ndarray | None = None,
):
    """The features panel (and the unit circle/sphere panel when ``normalized``) as one Figure."""
    dim = np.asarray(features).shape[1]
    if dim not in (2, 3):
        raise ValueError(f"features_figure draws 2-D or 3-D features, got {dim}-D")
    panels = 2 if normalized else 1
    fig = new_figure(4.2 * panels, 4.2)
    kwargs = dict(num_classes=num_classes, weights_are_points=weights_are_points, class_ids=class_ids)
    projection = "3d" if dim == 3 else None
    ax = fig.add_subplot(1, panels, 1, projection=projection)
    draw_features(ax, features, labels, weights, **kwargs)
    ax.set_title("features f", fontsize=9)
    if normalized:
        ax = fig.add_subplot(1, panels, 2, projection=projection)
        draw_features(ax, features, labels, weights, unit=True, **kwargs)
        ax.set_title("f / ||f|| (unit " + ("circle)" if dim == 2 else "sphere)"), fontsize=9)
    fig.subplots_adjust(  # the right margin holds the class legend
        left=0.1 / panels, right=1 - 0.13 / panels, bottom=0.07, top=0.86 if title else 0.92, wspace=0.22
    )
    class_legend(fig, labels, num_classes, loc="upper right", bbox_to_anchor=(1.0, 0.92 if not title else 0.86))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
