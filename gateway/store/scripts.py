"""Finding the Lua scripts (inside the installed package, or in a checkout's ``lua/``), and
composing the ones that include others.

The wheel ships ``lua/*.lua`` as ``gateway/_lua/`` (pyproject's force-include). An editable
install or a plain checkout imports ``gateway`` from the source tree, where ``_lua`` does not
exist; there the scripts are the checkout's top-level ``lua/``.

A script that makes two decisions in one round trip includes the scripts that make them
(``--#include ratelimit_take as take``): each included script's body becomes a local function
of ``(KEYS, ARGV)``, so its own ``KEYS``/``ARGV`` are the arguments it is called with and every
decision has one definition, whether it runs alone or inside another.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from pathlib import Path

__all__ = ["read_script", "script_names", "scripts_dir"]

_INCLUDE = re.compile(r"^--#include (\w+) as (\w+)$", re.MULTILINE)


@cache
def scripts_dir() -> Path:
    """The folder holding the ``.lua`` files; raises ``FileNotFoundError`` naming both places."""
    packaged = Path(str(files("gateway") / "_lua"))
    checkout = Path(__file__).resolve().parents[2] / "lua"
    for candidate in (packaged, checkout):
        if (candidate / "ratelimit_take.lua").is_file():
            return candidate
    msg = f"the gateway's Lua scripts are missing: looked in {packaged} and {checkout}"
    raise FileNotFoundError(msg)


def script_names() -> list[str]:
    """Every script's name (file name without ``.lua``), sorted."""
    return sorted(p.stem for p in scripts_dir().glob("*.lua"))


def read_script(name: str) -> str:
    """The source of ``lua/<name>.lua``, its includes expanded (one level: an included script
    includes nothing)."""
    source = (scripts_dir() / f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: _as_function(m.group(1), m.group(2)), source)


def _as_function(script: str, function: str) -> str:
    """``script``'s body, its documentation header left out, as ``local function function(KEYS, ARGV)``."""
    source = (scripts_dir() / f"{script}.lua").read_text(encoding="utf-8")
    if _INCLUDE.search(source):
        msg = f"{script}.lua includes another script; included scripts must not"
        raise ValueError(msg)
    body = source.split("]]", 1)[1] if source.startswith("--[[") else source
    return f"local function {function}(KEYS, ARGV)\n{body.strip()}\nend"
