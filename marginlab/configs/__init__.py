"""Hydra configs shipped with the package (the repo links them as configs/)."""
