"""The import contracts of ARCHITECTURE.md (pyproject's [tool.importlinter]): layers, no Prefect, no cycles."""
import os
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_a_broken_layer_is_caught(tmp_path, monkeypatch):
    """The check can fail: a lower layer that imports a higher one breaks the contract."""
    pkg = tmp_path / "pillsnap"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "bad.py").write_text("import pillsnap.high\n")
    (tmp_path / "setup.cfg").write_text("[importlinter]\nroot_package = pillsnap\n\n[importlinter:contract:1]\n"
                                        "name = layers\ntype = layers\nlayers =\n    pillsnap.high\n    pillsnap.low\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "pillsnap", raising=False)
    assert lint_imports(config_filename=str(tmp_path / "setup.cfg"), no_cache=True) == 1
    assert os.getcwd() == str(tmp_path)
