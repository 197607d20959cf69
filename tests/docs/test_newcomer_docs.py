"""The user's documents link only inside the repository, and every such link resolves.

A link out of the repository (``../shared/DESIGN.md``) works in the steering checkout and
is dead in a clone; a link to a renamed or missing file is dead everywhere.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest import ROOT

DOCS = ["README.md", *sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")))]
DOCS = [d for d in DOCS if d.endswith(".md")]

# [text](target) and [text]: target, outside code blocks and inline code
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def links(doc: str) -> list[str]:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    text = _CODE.sub("", _FENCE.sub("", text))
    return [a or b for a, b in _LINK.findall(text)]


def local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")


def test_the_docs_have_links() -> None:
    assert "docs/architecture.md" in links("README.md")
    assert "docs/troubleshooting.md" in links("README.md")
    assert sum(len(links(d)) for d in DOCS) >= 50


@pytest.mark.parametrize("doc", DOCS)
def test_no_link_leaves_the_repository(doc: str) -> None:
    root = os.path.realpath(ROOT)
    for target in filter(local, links(doc)):
        path = os.path.realpath(os.path.join(ROOT, os.path.dirname(doc), target.split("#")[0]))
        assert path == root or path.startswith(root + os.sep), f"{doc}: {target} is outside"
        assert "shared/" not in target, f"{doc}: {target}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc: str) -> None:
    for target in filter(local, links(doc)):
        file = target.split("#")[0]
        if not file:
            continue
        path = os.path.join(ROOT, os.path.dirname(doc), file)
        assert os.path.exists(path), f"{doc}: {target} does not exist"
