"""Finding and parsing the files a workflow uses: included workflows, task classes.

Files are read through ``Sources`` (a protocol with one ``read`` method) so that the
expander stays a pure function of its inputs; the command line passes one that reads
the disk, tests pass a dict. Each file is parsed once per expansion.

Layout, as in AliECS repositories: task classes live in ``tasks/NAME.yaml`` beside the
root workflow (or beside its ``workflows/`` folder); an include by name looks for
``NAME.yaml`` beside the including file, then in ``workflows/``.
"""

from __future__ import annotations

import posixpath
from typing import Protocol

from corral.templates.diagnostics import Diagnostics, Loc
from corral.templates.schema import Parser, TaskClassDef, WorkflowDef


class Sources(Protocol):
    """Read-only access to template files by path."""

    def read(self, path: str) -> str | None:
        """The file's text, or None when there is no such file."""
        ...


class DictSources:
    """Sources held in memory: for tests and for templates submitted over the API."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def read(self, path: str) -> str | None:
        return self.files.get(posixpath.normpath(path))


class Library:
    def __init__(self, root_file: str, sources: Sources, diags: Diagnostics) -> None:
        self.root_file = posixpath.normpath(root_file)
        self.sources = sources
        self.diags = diags
        root_dir = posixpath.dirname(self.root_file)
        self.task_dirs = [posixpath.join(root_dir, "tasks")]
        self.workflow_dirs = [root_dir]
        if posixpath.basename(root_dir) == "workflows":
            parent = posixpath.dirname(root_dir)
            self.task_dirs.append(posixpath.join(parent, "tasks"))
        else:
            self.workflow_dirs.append(posixpath.join(root_dir, "workflows"))
        self._workflows: dict[str, WorkflowDef | None] = {}
        self._classes: dict[str, TaskClassDef | None] = {}
        self.files: list[str] = []
        self.generated: dict[str, str] = {}  # files made during the expansion (dpl.*)

    def add_generated(self, name: str, workflow: str, classes: dict[str, str]) -> str:
        """Files a DPL description made: the workflow ``name`` beside the root and its
        task classes in the first task folder. Returns the workflow's path."""
        path = posixpath.join(self.workflow_dirs[0], name + ".yaml")
        self.generated[path] = workflow
        for cls, text in classes.items():
            self.generated[posixpath.join(self.task_dirs[0], cls + ".yaml")] = text
        return path

    def _peek(self, path: str) -> str | None:
        text = self.generated.get(path)
        return text if text is not None else self.sources.read(path)

    def _read(self, path: str) -> str | None:
        text = self._peek(path)
        if text is not None and path not in self.files:
            self.files.append(path)
        return text

    def workflow(self, path: str) -> WorkflowDef | None:
        """The parsed workflow at ``path``; None if missing or broken (reported once)."""
        path = posixpath.normpath(path)
        if path in self._workflows:
            return self._workflows[path]
        text = self._read(path)
        wf = None if text is None else Parser(path, self.diags).workflow(text)
        self._workflows[path] = wf
        return wf

    def find_include(self, ref: str, from_file: str) -> str | None:
        """The path an include reference names, or None when no candidate exists.
        ValueError for a reference outside the workflows' folders (an absolute path,
        ``..``): an include reads trusted template code, so it never reads a file a
        variable chose elsewhere."""
        here = posixpath.dirname(from_file)
        if ref.endswith((".yaml", ".yml")) or "/" in ref:
            candidates = [posixpath.normpath(posixpath.join(here, ref))]
        else:
            dirs = [here, *self.workflow_dirs]
            candidates = [posixpath.normpath(posixpath.join(d, ref + ".yaml")) for d in dirs]
        roots = [posixpath.normpath(d) for d in self.workflow_dirs]
        inside = [c for c in candidates if any(_within(c, r) for r in roots)]
        if not inside:
            raise ValueError(
                f"include {ref!r}: outside the workflows' folders "
                f"({', '.join(roots)}); name a workflow there"
            )
        for c in inside:
            if c in self._workflows or self._peek(c) is not None:
                return c
        return None

    def task_class(self, name: str, loc: Loc) -> TaskClassDef | None:
        """The task class ``name``; a missing one is reported at ``loc`` once."""
        if name in self._classes:
            return self._classes[name]
        tc = None
        if not name or "/" in name or name.startswith("."):
            self.diags.error(loc, f"bad task class name {name!r}")
        else:
            for d in self.task_dirs:
                path = posixpath.join(d, name + ".yaml")
                text = self._read(path)
                if text is not None:
                    tc = Parser(path, self.diags).task_class(text, name)
                    break
            else:
                where = ", ".join(posixpath.join(d, name + ".yaml") for d in self.task_dirs)
                self.diags.error(loc, f"no task class {name!r} (looked for {where})")
        self._classes[name] = tc
        return tc


def _within(path: str, folder: str) -> bool:
    """Whether the normalized ``path`` is inside the normalized ``folder``."""
    if folder == ".":
        return not path.startswith(("/", "../")) and path != ".."
    return path.startswith(folder.rstrip("/") + "/")
