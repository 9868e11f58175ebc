"""`mistral7b`: the command line.

    mistral7b generate "The capital of France is"      stream a completion (--json for one object)
    mistral7b chat                                      interactive, multi-turn; /system, /reset, /exit
    mistral7b info                                      config, parameters, bytes, KV cache of a model
    mistral7b memory --seq-len 32768                    KV cache / attention FLOP calculator (the paper's numbers)
    mistral7b convert SRC DST --to hf|mistral           HF <-> Mistral layouts, GGUF -> either
    mistral7b eval perplexity FILE                      perplexity of a model on a text file
    mistral7b serve                                     OpenAI-compatible HTTP server
    mistral7b fetch                                     download the bundled default model now
    mistral7b bench                                     our engine against HF transformers on one GPU

Each command is one module of this package with `add_arguments(parser)` and `run(args)`; `COMMANDS`
lists them. stdout carries only the answer (or JSON, or a path); notes and progress bars go to stderr. Exit codes:
0 success, 1 runtime failure (one line `mistral7b: error: ...`; --debug shows the traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import bench, chat, convert, eval, fetch, generate, info, memory, serve
from .common import PROG, CLIError, Formatter, common_options, error_message

COMMANDS = (generate, chat, info, memory, convert, eval, serve, fetch, bench)
__all__ = ["main", "build_parser", "COMMANDS", "CLIError"]


def _parents(command) -> list[argparse.ArgumentParser]:
    """The shared options a command takes: --model, --device, --dtype and --debug unless it says otherwise."""
    options = getattr(command, "COMMON", {})
    if options is None:  # only --debug
        debug = argparse.ArgumentParser(add_help=False)
        debug.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        return [debug]
    return [common_options(**options)]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, parents=_parents(command), formatter_class=Formatter, help=command.HELP,
                           description=command.DESCRIPTION, epilog=getattr(command, "EPILOG", None))
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    debug = "--debug" in argv or os.environ.get("MISTRAL7B_DEBUG") == "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    args.debug = debug = debug or getattr(args, "debug", False)
    from ..config import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, and keep Python from complaining at exit
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (CLIError, ModelLoadError, ValueError, OSError, RuntimeError, ImportError) as e:
        if debug:
            raise
        print(f"{PROG}: error: {error_message(e)}", file=sys.stderr)
        return 1


