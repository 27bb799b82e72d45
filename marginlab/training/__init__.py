"""One training run: the recipe (``train``), the loop (``engine``), the builders, checkpoints, resume, weights,
sweeps, schedules and the checks made during a run (collapse, margin feasibility).

Sits above the model packages (heads, losses, backbones, data, regularizers, distributed, geometry), config/ and
the bottom modules, which never import it; only commands/ imports the entry point (``train``)."""
