"""`mistral7b chat`: interactive multi-turn chat that streams answers and keeps the history."""

from __future__ import annotations

import argparse
import sys

from .common import add_kv_cache_dtype_option, add_compile_option, add_quantize_options, add_speculative_options, CLIError, add_sampling_arguments, load_llm, note, one_line, sampling_params

NAME = "chat"
HELP = "interactive multi-turn chat"
CHAT_HELP = ("commands: /system TEXT (set the system prompt), /reset (forget the conversation), /exit; "
             "Ctrl-C stops an answer, Ctrl-D exits")
DESCRIPTION = ("Multi-turn chat that streams answers and keeps the history.\n" + CHAT_HELP +
               ".\nWith stdin not a terminal, each input line is one user message.")
EXIT = object()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt (also settable with /system TEXT)")
    add_sampling_arguments(p)
    add_quantize_options(p)
    add_speculative_options(p)
    add_compile_option(p)
    add_kv_cache_dtype_option(p)


class Session:
    def __init__(self, llm, params, system: str | None, safe_prompt: bool, tty: bool):
        self.llm, self.params, self.system, self.safe_prompt, self.tty = llm, params, system, safe_prompt, tty
        self.history: list[dict] = []

    def command(self, line: str):
        """Apply a /command; EXIT ends the session."""
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit", "/bye"):
            return EXIT
        if command == "/reset":
            self.history.clear()
            note("conversation cleared")
        elif command == "/system":
            self.system = rest.strip() or None
            note(f"system prompt {'set' if self.system else 'cleared'}")
        elif command in ("/help", "/?"):
            note(CHAT_HELP)
        else:
            note(f"unknown command {command!r}; {CHAT_HELP}")
        return None

    def answer(self, line: str) -> None:
        """Stream the reply to one user message; Ctrl-C stops the reply, not the session."""
        user = {"role": "user", "content": line}
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [user]
        try:
            ids = self.llm.chat_prompt(messages, safe_prompt=self.safe_prompt)
            request, deltas = self.llm.stream_request(ids, self.params)
        except ValueError as e:  # e.g. the conversation outgrew the context: the session goes on
            note(f"error: {one_line(e)}; /reset starts a new conversation")
            return
        out, interrupted = sys.stdout, False
        try:
            for delta in deltas:
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            deltas.close()  # aborts the request if Ctrl-C stopped it
        out.write("\n\n" if self.tty else "\n")
        out.flush()
        if interrupted:
            note("answer stopped (Ctrl-C); the part shown is kept in the conversation")
        if request.text.strip():
            self.history += [user, {"role": "assistant", "content": request.text}]


def _read_line(tty: bool) -> str | None:
    """The next input line, or None at the end of input."""
    if tty:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    return sys.stdin.readline() or None


def run(args) -> int:
    params = sampling_params(args)
    llm = load_llm(args)
    if llm.tokenizer is None:
        raise CLIError(f"{llm.source}: this checkpoint has no tokenizer, so it has no chat format; "
                       "put a tokenizer.json or tokenizer.model next to the weights")
    tty = sys.stdin.isatty()
    session = Session(llm, params, args.system, args.safe_prompt, tty)
    if tty:
        note(f"chatting with {llm.source}; {CHAT_HELP}")
    while True:
        try:
            line = _read_line(tty)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if line is None:
            return 0
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if session.command(line) is EXIT:
                return 0
            continue
        session.answer(line)
