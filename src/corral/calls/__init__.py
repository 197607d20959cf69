"""Integrated-service calls around transitions, and their plugins (docs/calls.md)."""

from corral.calls._registry import (
    GROUP,
    CallContext,
    CallError,
    ParsedFunc,
    Plugin,
    Registry,
    parse_func,
)

__all__ = ["GROUP", "CallContext", "CallError", "ParsedFunc", "Plugin", "Registry", "parse_func"]
