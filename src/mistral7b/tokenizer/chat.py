"""Chat conversations: the one list of roles, the paper's guardrail prompt, and Mistral's instruct formats."""

from __future__ import annotations

# Every role a conversation may hold. A Jinja template would render any role as text, so unknown
# roles are rejected here, once, for the Python API, the CLI and the server alike.
ROLES = ("system", "user", "assistant", "tool")
# Names the OpenAI API accepts for a role we know by another name.
ROLE_ALIASES = {"developer": "system"}
MISTRAL_ROLES = ("system", "user", "assistant")  # Mistral's v1/v3 formats have no tool turns

GUARDRAIL_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)


def check_roles(messages: list[dict], roles: tuple[str, ...] = ROLES) -> None:
    """Raise ValueError naming the first message whose role is not one of `roles`."""
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in roles:
            raise ValueError(f"unknown chat role {role!r}: expected one of {', '.join(map(repr, roles))}")


def with_safe_prompt(messages: list[dict]) -> list[dict]:
    """The conversation with the guardrail prompt of the Mistral 7B paper (section 5) in front.

    Like the Mistral API's `safe_prompt`, the guardrail goes before the system prompt: it joins an
    existing first system message ("GUARDRAIL\\n\\nSYSTEM", the "\\n\\n" mistral-common uses to join
    system prompts) instead of adding a second system message, which templates that allow only one
    system message would reject.
    """
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = GUARDRAIL_PROMPT + "\n\n" + messages[0]["content"]
        return messages
    return [{"role": "system", "content": GUARDRAIL_PROMPT}, *messages]


def _split_turns(messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[dict], bool]:
    """(joined system prompt, alternating user/assistant turns, whether the last turn is a prefix)."""
    check_roles(messages, MISTRAL_ROLES)
    system, turns = [], []
    for m in messages:
        role, content = m["role"], m.get("content")
        if not isinstance(content, str) or (role != "user" and not content):
            raise ValueError(f"a {role} message needs text content, got {content!r}")
        if role == "system":
            system.append(content)
            continue
        expected = ("user", "assistant")[len(turns) % 2]
        if role != expected:
            raise ValueError(f"chat roles must alternate user/assistant/user/... (system messages aside); "
                             f"message {len(turns) + len(system)} is {role!r} where {expected!r} was expected")
        turns.append(m)
    if not turns:
        raise ValueError("the conversation has no user message")
    prefix = turns[-1]["role"] == "assistant" and bool(turns[-1].get("prefix"))
    if add_generation_prompt and turns[-1]["role"] == "assistant" and not prefix:
        raise ValueError("the last message must be the user's to generate a reply "
                         "(or an assistant message with 'prefix': True, to continue it)")
    return "\n\n".join(system), turns, prefix  # mistral-common joins several system prompts so


def mistral_chat(sp, version: str, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Mistral's instruct format, as mistral-common's InstructTokenizerV1 / V3 write it.

    v1: `<s>▁[INST]▁{system}\\n\\n{user}▁[/INST]▁{reply}</s>...`, system prompt in the FIRST user turn.
    v3: `<s>[INST]▁{user}[/INST]▁{reply}</s>...`, [INST] control tokens, system prompt in the LAST
    user turn, trailing spaces of replies dropped.
    """
    system_prompt, turns, prefix = _split_turns(messages, add_generation_prompt)
    v1 = version == "v1"
    system_turn = 0 if v1 else max(i for i, m in enumerate(turns) if m["role"] == "user")
    ids = [sp.bos_id()]
    for i, m in enumerate(turns):
        content = m["content"]
        if m["role"] == "user":
            if system_prompt and i == system_turn:
                content = system_prompt + "\n\n" + content
            if v1:
                ids += sp.encode(f"[INST] {content} [/INST]")
            else:
                ids += [sp.piece_to_id("[INST]"), *sp.encode(content), sp.piece_to_id("[/INST]")]
        else:
            ids += sp.encode(content if v1 else content.rstrip(" "))
            if not (prefix and i == len(turns) - 1):
                ids.append(sp.eos_id())
    return ids
