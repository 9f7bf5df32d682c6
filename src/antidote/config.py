"""Reading option files: one YAML reader shared by `--config` and run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """A YAML file's top-level mapping, with `-` in keys read as `_` (`mask-ratio` = `mask_ratio`)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise AntidoteError(f"config file {path} not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise AntidoteError(f"config file {path} is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise AntidoteError(f"config file {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
