"""Regularizers: extra weighted loss terms (center loss, feature incay) added by the engine."""

from marginlab.regularizers.base import Regularizer

__all__ = ["Regularizer"]
