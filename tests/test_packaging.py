"""What a non-editable ``pip install .`` ships: every Python package of the library and every
C++ source (the kernels compile from the installed copy)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    listed = set(_setuptools()["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "butterfly").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml's packages: {sorted(found - listed)}"


def test_every_cpp_source_is_package_data():
    patterns = _setuptools()["package-data"]["butterfly.csrc"]
    csrc = ROOT / "csrc"
    sources = [p for p in csrc.rglob("*") if p.suffix in (".cpp", ".h")]
    assert sources
    for path in sources:
        assert any(path.relative_to(csrc).match(pattern) or
                   Path("x", path.relative_to(csrc)).match(pattern) for pattern in patterns), path
