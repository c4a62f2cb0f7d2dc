"""The README's API tables say what ``businessworker.api`` is: every public function, with
its parameters in order, the keyword-only ones after ``*``."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from businessworker import api

README = Path(__file__).resolve().parents[2] / "README.md"


def documented() -> dict[str, list[str]]:
    """name -> its parameters as the README writes them ("*" for the keyword-only mark)."""
    text = README.read_text()
    section = text[text.index("### API (`from businessworker import api`)") :]
    section = section[: section.index("\n## ")]
    found: dict[str, list[str]] = {}
    for name, params in re.findall(r"`(?:await )?([a-z_]+)\(([^`]*)\)`", section):
        found[name] = [p.strip().split("=")[0] for p in params.split(",") if p.strip()]
    return found


def actual(name: str) -> list[str]:
    out: list[str] = []
    for param in inspect.signature(getattr(api, name)).parameters.values():
        if param.kind is param.KEYWORD_ONLY and "*" not in out:
            out.append("*")
        out.append(param.name)
    return out


def test_every_public_function_is_in_the_readme_as_it_is() -> None:
    listed = documented()
    assert sorted(listed) == sorted(api.__all__)
    for name in api.__all__:
        assert listed[name] == actual(name), name


def test_every_public_function_has_a_docstring() -> None:
    missing = [name for name in api.__all__ if not (getattr(api, name).__doc__ or "").strip()]
    assert not missing, missing
