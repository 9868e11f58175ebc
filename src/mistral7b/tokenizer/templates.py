"""Jinja chat templates, rendered in a sandbox: the template comes from a file, so it is untrusted input."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


def _raise_exception(message):
    raise ValueError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson: unlike Jinja's own, it keeps non-ASCII text and does not escape HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The template comes from a downloaded file: the sandbox keeps it from reaching Python internals.
    # trim_blocks/lstrip_blocks and these helpers are what HF renders templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"malformed chat template: {e}") from e


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The conversation as text, rendered by a Jinja chat template in a sandbox."""
    from jinja2 import TemplateError

    compiled = _compile_template(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e

