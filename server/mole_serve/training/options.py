"""Command lines of the training commands: one --flag per field of an options dataclass."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def options_parser(prog: str, description: str, options: type) -> argparse.ArgumentParser:
    """`--field-name` for each field of the `options` dataclass (its default and type), and --adapters-dir."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for field in fields(options):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):  # --flag / --no-flag (type=bool would read "False" as true)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            p.add_argument(flag, type=type(field.default), default=field.default)
    p.add_argument("--adapters-dir", type=Path, default=Path("adapters_store"))
    return p


def parse_options(
    parser: argparse.ArgumentParser, options: type[T], argv: list[str] | None
) -> tuple[T, argparse.Namespace]:
    """The `options` dataclass from the command line, and every parsed argument."""
    args = parser.parse_args(argv)
    return options(**{field.name: getattr(args, field.name) for field in fields(options)}), args
