"""Checkpoint converters: third-party weight formats to transformers-compatible state dicts."""
