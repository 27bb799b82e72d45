"""Run logging: TensorBoard scalars, metrics.jsonl per epoch, metrics.json at the end."""

from marginlab.logging.run_log import RunLog

__all__ = ["RunLog"]
