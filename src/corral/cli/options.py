"""Options shared by many commands, in a module that imports nothing heavy (the client
commands use them and must start fast)."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import click


def parse_vars(pairs: Iterable[str]) -> dict[str, str]:
    """``k=v`` pairs from --var; the value is kept as text (JSON lists stay JSON text)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE", param_hint="--var")
        out[key.strip()] = value
    return out


var_option = click.option(
    "--var", "variables", multiple=True, metavar="NAME=VALUE", help="Set a variable (repeatable)."
)


@contextmanager
def no_gc() -> Iterator[None]:
    """Without the cyclic garbage collector: for importing a command's modules, which
    makes hundreds of thousands of objects and no garbage (the collector's passes
    over them cost ~15 % of `corral run`'s start)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


__all__ = ["no_gc", "parse_vars", "var_option"]
