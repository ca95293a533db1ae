"""The network, its checkpoints and the registry of model versions (needs torch)."""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, new_checkpoint, save_checkpoint
from .network import NetConfig, OmniSegNet, count_parameters, fg_probability, foreground
from .registry import ModelRegistry, resolve_checkpoint, shipped_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ModelRegistry",
    "NetConfig",
    "OmniSegNet",
    "count_parameters",
    "fg_probability",
    "foreground",
    "load_checkpoint",
    "new_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "shipped_checkpoint",
]
