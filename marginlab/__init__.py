"""marginlab: train and compare margin-based softmax losses under one trainer."""

__version__ = "0.1.0"
