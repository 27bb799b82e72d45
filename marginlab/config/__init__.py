"""Typed configuration: schemas in a ConfigStore, resolvers, and validation of `_target_` nodes."""

from marginlab.config.schema import register_configs

register_configs()
