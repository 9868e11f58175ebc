"""Tokenizers and chat formats.

`backends` holds the `Tokenizer` class (sentencepiece and tokenizers), `chat` the roles, the guardrail
prompt and Mistral's instruct formats, `templates` the Jinja sandbox, `gguf_vocab` the rebuilding of a
GGUF's vocabulary, and `detokenize` the streaming decoder.
"""

from .backends import END_OF_TURN_TOKENS, Tokenizer, TokenizerError
from .chat import GUARDRAIL_PROMPT, ROLES, check_roles, with_safe_prompt
from .detokenize import StreamDecoder
from .templates import render_chat_template

__all__ = ["Tokenizer", "TokenizerError", "END_OF_TURN_TOKENS", "GUARDRAIL_PROMPT", "ROLES", "check_roles",
           "with_safe_prompt", "StreamDecoder", "render_chat_template"]
