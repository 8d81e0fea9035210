"""The documentation stays true: the configuration page is the settings table, the README stays short, links resolve."""

from __future__ import annotations

import os
import re

from llm_blueprint.settings import SETTINGS, configuration_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_the_configuration_page_is_generated_from_the_settings():
    assert _read("docs", "configuration.md") == configuration_markdown(), (
        "docs/configuration.md is stale: python -m llm_blueprint.settings > docs/configuration.md")
    page = _read("docs", "configuration.md")
    assert all(f"`{s.key}`" in page for s in SETTINGS)


def test_the_readme_is_short_and_its_commands_are_the_ci_ones():
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 200
    ci = _read(".ci", "run").strip().splitlines()[-1]
    assert ci in readme


def test_every_relative_link_of_the_docs_resolves():
    for folder, name in [("", "README.md")] + [("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")]:
        text = _read(folder, name) if folder else _read(name)
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert os.path.exists(os.path.join(ROOT, folder, target)), f"{folder}/{name} links to missing {target}"
