"""Synthetic degradations: kernels, batched operators and the YAML presets that compose them."""

from bfr_models.degradations.presets import Preset, PresetError, list_presets, load_preset

__all__ = ["Preset", "PresetError", "list_presets", "load_preset"]
