"""Calibration data: reading files, mapping fields, formatting with a prompt template."""

from antidote.data.loading import Example, load_examples
from antidote.data.templates import TEMPLATES, format_example, tokenize_examples

__all__ = ["TEMPLATES", "Example", "format_example", "load_examples", "tokenize_examples"]
