"""Figures drawn on one background thread (matplotlib's Agg, no pyplot) from arrays that are never changed
afterwards, so drawing overlaps with training; their pixels reach TensorBoard from the main thread
(``log_finished``, or ``close``, which waits for every figure). A figure never fails a run: any exception
while drawing is logged as a warning."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from marginlab.geometry.render import FIGURES_DIR

log = logging.getLogger(__name__)


class FigurePool:
    """Draws figures into ``<run_dir>/figures/`` on one background thread; logs them to ``writer``."""

    def __init__(self, run_dir: Path, writer=None):
        self.run_dir = Path(run_dir)
        self.writer = writer
        self.seconds = 0.0  # drawing time, spent on the background thread
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future, str, int]] = []  # (figure pixels, TensorBoard tag, step)

    def submit(self, name: str, tag: str, step: int, make_figure) -> None:
        """Draws ``make_figure()`` to figures/<name> in the background; TensorBoard gets it under ``tag``."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="marginlab-figures")
        self._pending.append((self._pool.submit(self._draw, name, make_figure), tag, step))

    def _draw(self, name: str, make_figure) -> np.ndarray | None:
        """Draws one figure to figures/<name>; returns its pixels, or None (with a warning) when it fails."""
        from marginlab.figures import save_png

        start = time.perf_counter()
        try:
            fig = make_figure()
            return None if fig is None else save_png(fig, self.run_dir / FIGURES_DIR / name)
        except Exception as exc:  # noqa: BLE001 - a figure is never required for a run to succeed
            log.warning("figure %s not drawn: %s: %s", name, type(exc).__name__, exc)
            return None
        finally:
            self.seconds += time.perf_counter() - start

    def log_finished(self, wait: bool = False) -> None:
        """Sends finished figures to TensorBoard (all of them, waiting, with ``wait``)."""
        still = []
        for future, tag, step in self._pending:
            if not (wait or future.done()):
                still.append((future, tag, step))
                continue
            rgba = future.result()
            if rgba is not None and self.writer is not None:
                try:
                    self.writer.add_image(tag, rgba[..., :3], step, dataformats="HWC")
                except Exception as exc:  # noqa: BLE001
                    log.warning("figure %s not logged to TensorBoard: %s: %s", tag, type(exc).__name__, exc)
        self._pending = still

    def close(self) -> None:
        """Waits for every figure, logs them, and stops the thread."""
        self.log_finished(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            log.info("geometry figures: %.2f s of drawing on the background thread", self.seconds)
