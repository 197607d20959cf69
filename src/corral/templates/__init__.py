"""Workflow templates: YAML plus CEL expressions, expanded into a plan. Pure.

The public surface:

- ``expand(path, sources, variables=..., seed=...) -> Plan`` (raises TemplateError)
- ``check(...) -> (Plan | None, [Diagnostic])``
- ``Sources`` / ``DictSources``: how template files are read
"""

from corral.templates.diagnostics import Diagnostic, Loc, TemplateError
from corral.templates.expansion import check, expand, parse_duration
from corral.templates.library import DictSources, Sources

__all__ = [
    "Diagnostic",
    "DictSources",
    "Loc",
    "Sources",
    "TemplateError",
    "check",
    "expand",
    "parse_duration",
]
