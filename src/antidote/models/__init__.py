"""Model loading: HF folders, hub ids, GGUF files, the embedded default, LoRA adapters."""

from antidote.models.loading import (
    EMBEDDED_NAME,
    LoadedModel,
    check_finite_parameters,
    check_load_options,
    load_model,
    resolve_model_folder,
    wrap_model,
)

__all__ = [
    "EMBEDDED_NAME",
    "LoadedModel",
    "check_finite_parameters",
    "check_load_options",
    "load_model",
    "resolve_model_folder",
    "wrap_model",
]
