"""mistral7b: a fast, faithful PyTorch implementation of Mistral 7B and an inference engine built on it."""

from .config import PRESETS, ModelConfig, ModelLoadError, preset
from .cache import KVCache
from .loading import load_model
from .model import Transformer

__all__ = ["ModelConfig", "ModelLoadError", "PRESETS", "preset", "KVCache", "Transformer", "load_model"]
__version__ = "0.1.0"
