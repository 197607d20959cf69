"""The documentation's YAML examples are valid YAML, and its commands exist."""

from __future__ import annotations

import os
import re

import yaml

from tests.conftest import ROOT


def blocks(path: str, lang: str) -> list[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!public", lambda loader, node: None)


def test_template_doc_yaml_examples_parse() -> None:
    found = blocks("docs/templates.md", "yaml")
    assert len(found) >= 10
    for block in found:
        yaml.load(block, Loader=_Loader)  # raises on a broken example


def test_readme_names_the_two_commands() -> None:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "scripts/demo" in readme and "scripts/test" in readme
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "exec scripts/test" in f.read()
