"""mistral7b: a fast, faithful PyTorch implementation of Mistral 7B and an inference engine built on it."""

from .cache import KVCache
from .config import PRESETS, ModelConfig, ModelLoadError, preset
from .engine import SpeculativeConfig
from .evaluate import PerplexityResult, perplexity, text_perplexity
from .llm import LLM, CompletionOutput
from .loading import load_model
from .lora import LoRARequest
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import GUARDRAIL_PROMPT, Tokenizer, TokenizerError

__all__ = [
    "SpeculativeConfig", "LoRARequest",
    "LLM", "CompletionOutput", "SamplingParams", "Tokenizer", "TokenizerError", "GUARDRAIL_PROMPT",
    "ModelConfig", "ModelLoadError", "PRESETS", "preset", "KVCache", "Transformer", "load_model",
    "perplexity", "text_perplexity", "PerplexityResult",
]
__version__ = "0.1.0"
