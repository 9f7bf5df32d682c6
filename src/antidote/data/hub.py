"""Rows of a data set on the Hugging Face hub, through the optional `datasets` package."""

from __future__ import annotations

from typing import Any

from antidote.errors import AntidoteError

PREFIX = "hf:"


def read_hub(source: str) -> list[dict[str, Any]]:
    """Rows of `hf:NAME[:SPLIT]` (split default: train)."""
    name, _, split = source[len(PREFIX) :].partition(":")
    return load_hub_rows(name, None, split or "train", source=source, fix="use a local file")


def load_hub_rows(
    repo: str, config: str | None, split: str, *, source: str, fix: str
) -> list[dict[str, Any]]:
    """`datasets.load_dataset(repo, config, split=split)` as a list of dicts.

    source: what the user asked for (named in errors); fix: the advice appended to every error.
    """
    try:
        import datasets
    except ImportError as err:
        raise AntidoteError(
            f"{source} needs the `datasets` package (pip install 'antidote-realign[hub]'), or {fix}"
        ) from err
    try:
        return [dict(row) for row in datasets.load_dataset(repo, config, split=split)]
    except Exception as err:  # offline, unknown name or split, gated data set
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AntidoteError(f"cannot load {source} from the hub ({repo}: {first}); {fix}") from err
