"""zeroshard: ZeRO stage 1/2/3 sharding for PyTorch, with the numbers of plain data parallel."""

from ._comm import CommStats
from ._safetensors import save_full_model
from .checkpoint import load_checkpoint, save_checkpoint
from .memory import estimate_memory
from .mixed_precision import MixedPrecision
from .optimizer import ZeroOptimizer

__all__ = ["CommStats", "MixedPrecision", "ZeroOptimizer", "estimate_memory", "load_checkpoint",
           "save_checkpoint", "save_full_model"]
__version__ = "0.1.0"
