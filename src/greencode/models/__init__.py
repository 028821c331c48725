"""The early-exit wrapper over HF decoders, the exit schedule and LITE weights."""

from greencode.models.early_exit import ADAPTERS, EXITS_FILE, EarlyExitModel, FamilyAdapter
from greencode.models.schedule import exit_schedule, lite_weights, resolve_exit_layers, split_halves, validate_exit_layers

__all__ = ["ADAPTERS", "EXITS_FILE", "EarlyExitModel", "FamilyAdapter", "exit_schedule", "lite_weights",
           "resolve_exit_layers", "split_halves", "validate_exit_layers"]
