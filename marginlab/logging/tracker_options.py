"""The options node of an experiment tracker in the run's config (``logger.mlflow``, ``logger.wandb``)."""

from __future__ import annotations


def tracker_options(cfg, name: str):
    """``cfg.logger.<name>`` as a mapping, ``{}`` for a bare ``true``; None when unset or false (the tracker
    is off, and its package is never imported)."""
    logger = cfg.get("logger") or {}
    options = logger.get(name) if hasattr(logger, "get") else None
    if options is None or options is False:
        return None
    return options if hasattr(options, "get") else {}
