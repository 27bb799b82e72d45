"""Margin heads: one file per head, all on `MarginHead` (see base.py for the contract)."""

from marginlab.heads.base import CosineMarginHead, MarginHead

__all__ = ["MarginHead", "CosineMarginHead"]
