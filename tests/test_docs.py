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


def test_every_corral_command_in_the_docs_parses() -> None:
    """Each `corral ...` line of the README and docs names real commands and options.

    Appending --help makes click parse the whole line (an unknown option or command
    fails with exit 2) and then print help instead of running it.
    """
    import shlex

    from click.testing import CliRunner

    from corral.cli.main import cli

    lines = []
    for doc in ["README.md", *(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")))]:
        for block in blocks(doc, "sh"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("|")[0].split(" #")[0].strip()
                if line.startswith("corral "):
                    lines.append((doc, line))
    assert len(lines) >= 10
    runner = CliRunner()
    for doc, line in lines:
        args = [*shlex.split(line)[1:], "--help"]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, f"{doc}: {line!r}: {result.output}"
