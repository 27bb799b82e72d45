"""Data sets: each config in configs/dataset/ builds one `ClassificationData` subclass."""
