"""Experiments: the demo pipeline."""
