"""Package layering, checked on the source (``ast``): which module may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import perspicio

SRC = Path(perspicio.__file__).parent

#: known violations outside the propagation/speed-layer work of issue 15, with their owner; each entry
#: must still be a violation (the test fails when one is fixed, so the list only shrinks)
CORE_UPWARD_ALLOWED: dict[tuple[str, str], str] = {}
PRIVATE_CORE_ALLOWED: dict[tuple[str, str], str] = {}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` for every import in ``path`` (function-level ones too)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; an __init__'s own package
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((module, [a.name for a in node.names]))
    return found


def _modules(under: str) -> list[Path]:
    return sorted((SRC / under).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def test_methods_import_no_private_core_names() -> None:
    bad = set()
    for path in _modules("methods"):
        for module, names in _imports(path):
            if module == "perspicio.core" or module.startswith("perspicio.core."):
                tail = module.split(".")[2:]
                private = [n for n in [*tail, *names] if n.startswith("_") and n != "__future__"]
                if private:
                    bad.add((_name(path), f"{module}: {', '.join(private)}"))
    assert {b for b in bad if b not in PRIVATE_CORE_ALLOWED} == set(), bad
    assert not [k for k in PRIVATE_CORE_ALLOWED if k not in bad], "allowlisted entry no longer violates: remove it"


def test_core_imports_nothing_above() -> None:
    above = ("perspicio.methods", "perspicio.metrics", "perspicio.viz", "perspicio.cli", "perspicio.featurevis",
             "perspicio.zoo")
    bad = set()
    for path in _modules("core"):
        for module, names in _imports(path):
            targets = [module] + ([f"{module}.{n}" for n in names] if module == "perspicio" else [])
            for t in targets:
                hit = next((a for a in above if t == a or t.startswith(a + ".")), None)
                if hit is not None:
                    bad.add((_name(path), hit))
    assert {b for b in bad if b not in CORE_UPWARD_ALLOWED} == set(), bad
    assert not [k for k in CORE_UPWARD_ALLOWED if k not in bad], "allowlisted entry no longer violates: remove it"


def test_only_core_kernels_names_onednn() -> None:
    """oneDNN's private operators (``torch.ops.mkldnn``) are used through core/kernels.py only."""
    users = [_name(p) for p in SRC.rglob("*.py") if "mkldnn" in "".join(
        ast.unparse(n) for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute))]
    assert users == ["core/kernels.py"], users


def test_propagation_modes_declare_the_fused_call_protocol() -> None:
    from perspicio.core import kernels
    from perspicio.methods.propagation.engine import PropagationMode

    assert getattr(PropagationMode, kernels.SEES_FUSED_CALLS) is True


def test_library_packages_do_not_import_the_facade() -> None:
    """``perspicio/__init__.py`` is the facade for users; the packages below it import what they
    need from the registry and the modules (a facade import would invert the layering)."""
    facade = {n.name for n in ast.parse((SRC / "__init__.py").read_text()).body if isinstance(n, ast.FunctionDef)}
    assert "explain" in facade and "evaluate" in facade
    bad = set()
    for under in ("core", "methods", "metrics", "featurevis", "trees", "zoo"):
        if not (SRC / under).is_dir():
            continue
        for path in _modules(under):
            for module, names in _imports(path):
                if module == "perspicio" and (not names or set(names) & facade):  # `import perspicio`, `from .. import explain`
                    bad.add(_name(path))
    assert bad == set(), bad


#: the one home of each shared helper of issue 15's "one vocabulary"; a function of that name
#: anywhere else is a second copy (None: the name must not exist at all any more)
ONE_HOME: dict[str, str | None] = {
    "check_int": "core/options.py",
    "check_float": "core/options.py",
    "check_choice": "core/options.py",
    "check_positive_int": None,
    "check_fraction": None,
    "to_jsonable": "core/jsonable.py",
    "slice_target": "core/targets.py",
    "row_scores": "core/targets.py",
    "target_names": "core/targets.py",
    "chunk_target": None,
    "_score_fn": None,
    "_jsonable": None,
    "_plain": None,
}
#: copies in packages being written in parallel, with their owner; the test fails once one is gone
KNOWN_COPIES: dict[tuple[str, str], str] = {}


def test_shared_helpers_have_one_home() -> None:
    found: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and node.name in ONE_HOME:
                found.setdefault(node.name, []).append(_name(path))
    copies = {(name, f) for name, files in found.items() for f in files if f != ONE_HOME[name]}
    missing = [name for name, home in ONE_HOME.items() if home is not None and home not in found.get(name, [])]
    assert copies - set(KNOWN_COPIES) == set() and missing == [], (copies, missing)
    assert set(KNOWN_COPIES) <= copies, "a known copy is gone: remove it from KNOWN_COPIES"
