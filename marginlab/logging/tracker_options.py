"""The options node of an experiment tracker in the run's config (``logger.mlflow``, ``logger.wandb``)."""

from __future__ import annotations

#: the experiment trackers, each a ``logger=<name>`` option whose node ``logger.<name>`` is null otherwise
TRACKERS = ("mlflow", "wandb")


def tracker_options(cfg, name: str):
    """``cfg.logger.<name>`` as a mapping, ``{}`` for a bare ``true``; None when unset or false (the tracker
    is off, and its package is never imported)."""
    logger = cfg.get("logger") or {}
    options = logger.get(name) if hasattr(logger, "get") else None
    if options is None or options is False:
        return None
    return options if hasattr(options, "get") else {}


def unchosen_tracker(overrides: list[str]):
    """The one-line ConfigError for ``logger.wandb.mode=online`` without ``logger=wandb`` (its node is null
    then, and OmegaConf fails with an AssertionError and its traceback); None when no such override is given."""
    from marginlab.errors import ConfigError

    chosen = {o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "logger" and "=" in o}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        name = key.split(".")[1] if key.startswith("logger.") and key.count(".") >= 2 else None
        if name in TRACKERS and name not in chosen:
            return ConfigError(
                f"{override}: no {name} tracker is chosen, so logger.{name} has no keys to set; choose "
                f"logger={name} first (marginlab train logger={name} {override})"
            )
    return None
