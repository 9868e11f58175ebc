"""`mistral7b fetch`: download the bundled default model now and print its path."""

from __future__ import annotations

import argparse

from .common import note

NAME = "fetch"
HELP = "download the default model now and print its path"
DESCRIPTION = "Download the bundled default model (once) and print its path."
COMMON = None  # no model, device or dtype options


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args) -> int:
    from ..default_model import DESCRIPTION as MODEL, default_model_path

    path = default_model_path(download=True)
    note(f"default model: {MODEL}")
    print(path)
    return 0
