"""The Lua scripts ship in the wheel and are found from a wheel, an editable install and a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gateway.store.scripts import scripts_dir

ROOT = Path(__file__).resolve().parents[1]
LUA = sorted(p.name for p in (ROOT / "lua").glob("*.lua"))
FIND = (
    "import gateway.store.scripts as s; print(s.scripts_dir()); "
    "print(len(s.read_script('ratelimit_take')))"
)


def where_scripts_are_found(sys_path_first: Path) -> Path:
    """Ask a fresh interpreter, with ``sys_path_first`` ahead of everything, where the scripts are."""
    code = f"import sys; sys.path.insert(0, {str(sys_path_first)!r}); {FIND}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True, cwd=sys_path_first)
    found, size = out.stdout.split()
    assert int(size) > 100
    return Path(found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    (built,) = out.glob("gateway-*.whl")
    return built


@pytest.mark.slow
def test_wheel_contains_every_script(wheel: Path) -> None:
    """Every lua/*.lua is inside the wheel as gateway/_lua/<name>.lua, byte for byte."""
    assert LUA, "no scripts in lua/"
    with zipfile.ZipFile(wheel) as zf:
        for name in LUA:
            assert zf.read(f"gateway/_lua/{name}") == (ROOT / "lua" / name).read_bytes()


@pytest.mark.slow
def test_installed_wheel_finds_its_packaged_scripts(wheel: Path, tmp_path: Path) -> None:
    """Unpacked (as an install would), the package uses its own gateway/_lua, not a checkout's."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    assert where_scripts_are_found(tmp_path) == tmp_path / "gateway" / "_lua"


def test_plain_checkout_finds_top_level_lua(tmp_path: Path) -> None:
    """A checkout imported without any install finds the scripts in its top-level lua/."""
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "lua", tmp_path / "lua")
    assert where_scripts_are_found(tmp_path) == tmp_path / "lua"


def test_editable_install_finds_the_checkout_scripts() -> None:
    """This test run (an editable install or a checkout) uses the checkout's lua/."""
    assert scripts_dir() == ROOT / "lua"
