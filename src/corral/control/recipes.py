"""Recipes: how to expand an environment's plan again, exactly, in a later control
process.

A recipe holds the text of every template file the expansion read (the workflow, its
includes, its task classes), the caller's variables, the defaults the control process
supplied, the seed, and what the site answered (``templates.services``: inventory,
configuration, runtime entries, DPL descriptions). Expanding it again gives the same
plan even when the files on disk, or the site, changed or are gone since. It is kept
with the environment in the store (a few kilobytes), so that a control server that
restarts can take over the environments a previous one left: RECOVER them, or destroy
them.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping

from corral.model.plan import Plan
from corral.templates import Diagnostic, DictSources, Sources, check
from corral.templates.services import ReplaySite

VERSION = 1


class RecordingSources:
    """Reads through another ``Sources`` and keeps what it read, for the recipe."""

    def __init__(self, inner: Sources) -> None:
        self.inner = inner
        self.files: dict[str, str] = {}

    def read(self, path: str) -> str | None:
        text = self.inner.read(path)
        if text is not None:
            self.files[posixpath.normpath(path)] = text
        return text

    def __getattr__(self, name: str) -> object:  # e.g. DiskSources.problems
        return getattr(self.inner, name)


def make(
    root: str,
    files: Mapping[str, str],
    variables: Mapping[str, str],
    defaults: Mapping[str, str],
    seed: str,
    site: Mapping[str, str | None] | None = None,
) -> str:
    data: dict[str, object] = {
        "version": VERSION,
        "root": root,
        "files": dict(files),
        "variables": dict(variables),
        "defaults": dict(defaults),
        "seed": seed,
    }
    if site:  # what the site answered (inventory, configuration, DPL descriptions)
        data["site"] = dict(site)
    return json.dumps(data, sort_keys=True)


def replay(recipe: str) -> tuple[Plan | None, list[Diagnostic] | str]:
    """The plan again, or why not (the template's errors, or a text)."""
    try:
        r = json.loads(recipe)
        if r.get("version") != VERSION:
            return None, f"a recipe of version {r.get('version')!r}, not {VERSION}"
        root, files = r["root"], r["files"]
        variables, defaults, seed = r["variables"], r["defaults"], r["seed"]
        site = ReplaySite(r.get("site") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"an unreadable recipe: {e}"
    plan, diags = check(
        root, DictSources(files), variables=variables, global_defaults=defaults, seed=seed,
        services=site,
    )  # fmt: skip
    return plan, diags
