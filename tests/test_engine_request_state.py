"""One owner for request state (issue 23 item 4): only engine/request.py (Request's own methods) and
engine/scheduler.py change a request. The output processor, the runner, the speculator and the server
read requests and call those methods; an ast scan of the package holds every other module to it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mistral7b"
OWNERS = {"engine/request.py", "engine/scheduler.py"}
REQUEST_NAMES = {"request", "req", "r"}  # the names a Request goes by in this code base
MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update", "add",
            "discard", "setdefault", "popitem"}
# Request's own fields, distinctive enough that in engine/ an assignment to one on any object but `self`
# is a request's (in server/ `finish_reason` and `prompt_logprobs` also name response and params fields).
FIELDS = {"output_ids", "finish_reason", "finish_time", "first_token_time", "arrival_time", "n_prefilled",
          "lora_slot", "prompt_logprobs", "_stop_ids", "_constraint", "_stream"}


def _is_request(node: ast.expr) -> bool:
    """`request`, `req`, `r`, `<x>.request` or `requests[i]`."""
    if isinstance(node, ast.Name):
        return node.id in REQUEST_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr == "request"
    if isinstance(node, ast.Subscript):
        base = node.value
        return (base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)) == "requests"
    return False


def _reaches_request(node: ast.expr) -> bool:
    """Whether `node` is a request or a part of one (`request.output_ids`, `request._constraint.x`)."""
    while True:
        if _is_request(node):
            return True
        if not isinstance(node, (ast.Attribute, ast.Subscript)):
            return False
        node = node.value


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        found = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        found = [node.target]
    elif isinstance(node, ast.Delete):
        found = list(node.targets)
    else:
        return []
    out = []
    while found:  # unpack `a.x, b.y = ...`
        t = found.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            found.extend(t.elts)
        else:
            out.append(t)
    return out


def request_writes(source: str, fields: bool = True) -> list[int]:
    """Line numbers where `source` writes to a request: assigns or deletes an attribute or item of one,
    calls a list/dict/set mutator on a part of one, setattr()s one, or (`fields`) assigns a Request
    field of any other object but `self`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        for t in _targets(node):
            if isinstance(t, (ast.Attribute, ast.Subscript)) and _reaches_request(t.value):
                lines.append(t.lineno)
            elif fields and isinstance(t, ast.Attribute) and t.attr in FIELDS and not (
                    isinstance(t.value, ast.Name) and t.value.id == "self"):
                lines.append(t.lineno)
        if isinstance(node, ast.Call):
            f = node.func
            part_of_request = isinstance(f, ast.Attribute) and isinstance(f.value, (ast.Attribute, ast.Subscript)) \
                and _reaches_request(f.value)
            if part_of_request and f.attr in MUTATORS:
                lines.append(node.lineno)
            if isinstance(f, ast.Name) and f.id == "setattr" and node.args and _reaches_request(node.args[0]):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_only_request_and_scheduler_write_request_state():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in OWNERS:
            wrong += [f"{rel}:{line}" for line in request_writes(path.read_text(), rel.startswith("engine/"))]
    assert not wrong, "request state written outside Request and the scheduler:\n" + "\n".join(wrong)


# Lines the code wrote before the scheduler owned request state (engine/output.py, constraints.py,
# core.py, runner.py, server/engine_client.py): the scan must catch each.
OLD = """\
request.output_ids.append(token)
request.finish_reason = "stop"
request._decoded += request._decoder.push(token)
request._stop_scanned, request._stop_held = len(final), hold
request.logprobs.append(TokenLogprob(token, lp[0][i], top))
request._constraint = structured.Constraint.from_params(request.params, tokenizer)
request.prompt_logprobs = [None]
request._constraint.accepting = accepting[n - 1]
request.logprobs += new_logprobs
r.n_prefilled += chunk.length
d.request.finish_time = now
requests[i].row = None
setattr(request, "text", "")
seq.first_token_time = now
"""

# What the code does instead, and what any module may do with requests: none of it is a write.
ALLOWED = """\
request.append_token(token, entry, now)
request.finish("stop")
text, stopped = request._stream.push(token, finished, accepting)
self.requests[rid], self.subscribers[rid] = request, sub
self.looked_up.add(request)
self.finish_reason = reason
delta = Delta(request, text, [token], request.finish_reason)
request._constraint.consume(token)
"""


def test_the_scan_catches_each_old_write_and_no_read():
    assert request_writes(OLD) == list(range(1, OLD.count("\n") + 1))
    assert request_writes(ALLOWED) == []
