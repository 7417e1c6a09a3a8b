"""Finding the Lua scripts: inside the installed package, or in a checkout's ``lua/``.

The wheel ships ``lua/*.lua`` as ``gateway/_lua/`` (pyproject's force-include). An editable
install or a plain checkout imports ``gateway`` from the source tree, where ``_lua`` does not
exist; there the scripts are the checkout's top-level ``lua/``.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

__all__ = ["read_script", "script_names", "scripts_dir"]


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
    """The source of ``lua/<name>.lua``."""
    return (scripts_dir() / f"{name}.lua").read_text(encoding="utf-8")
