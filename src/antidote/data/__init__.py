"""Data: reading records, named data sets, prompt/response pairs and prompt templates.

Modules, each importing only those after it: templates (alpaca/chat/plain, `check_template`) -> loading
(`Example`, field mapping, `load_examples`) -> catalog (named data sets, `read_rows`) -> formats (JSONL/JSON/
CSV files), hub (`hf:NAME[:SPLIT]`), builtin (the project's own data).
"""

from antidote.data.loading import Example, load_examples
from antidote.data.templates import TEMPLATES, check_template, format_example, tokenize_examples

__all__ = ["TEMPLATES", "Example", "check_template", "format_example", "load_examples", "tokenize_examples"]
