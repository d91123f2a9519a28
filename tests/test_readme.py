"""The README's methods table is generated from the registry and must not drift."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_methods_table_matches_registry():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "README.md").read_text()
    assert mod.render(text) == text, "README methods table is stale: run python scripts/update_readme.py"


def test_readme_test_command_is_what_ci_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    assert "pytest" in block and "'.[test]'" in block
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "cat_gradcam.png").stat().st_size > 1000


def test_method_selection_is_shared_and_family_default_is_the_whole_family():
    """`cam` is both a method and a family: the default selects the family, `cam` the method."""
    from perspicio.core.registry import METHODS
    from perspicio.metrics.evaluate import resolve_methods

    cams = METHODS.names("cam")
    assert len(cams) == 10
    assert resolve_methods(None) == cams
    assert resolve_methods("cam") == ["cam"]
    assert resolve_methods("family:cam,saliency") == [*cams, "saliency"]
    assert METHODS.select("gradient") == METHODS.names("gradient")
    assert METHODS.select([], default=["family:cam"]) == cams
