"""The layering of src/magistune, read from the source (every import statement, function-level ones included):

    rank 0  __init__ (the version), config_compat, config_sections, config_checks, tokenizer
    rank 1  config, hf_tokenizer   (Hugging Face tokenizers beside tokenizer's mistral-common ones)
    rank 2  model_files       where a base_model is and the files in it (tiny, local, HF cache, native layout)
            tokenizer_edit    the run's tokenizer file: the config's token edits applied
    rank 3  data, model
    rank 4  export, train
    rank 5  infer             (may use train's loss and batches)
            inspection        (`magistune inspect`: data, tokenizer, train's packing)
    rank 6  cli_parser        (the command line's arguments)
    rank 7  cli               (runs the sub-commands)
    rank 8  __main__

A top-level module or package imports itself and strictly lower ranks only: data and model never import each
other, export and train neither. Inside a package no two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "magistune"

LAYERS = {
    "__init__": 0, "config_compat": 0, "config_sections": 0, "config_checks": 0, "tokenizer": 0,
    "config": 1, "hf_tokenizer": 1,
    "paths": 2, "tokenizer_edit": 2,
    "model_files": 2,
    "data": 3, "model": 3,
    "export": 4, "train": 4,
    "infer": 5, "inspection": 5,
    "cli_parser": 6,
    "cli": 7,
    "__main__": 8,
}


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of the package at `root` (a package's name is its __init__.py)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = (root.name, *f.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(modules: dict[str, Path], top: str) -> list[tuple[str, str, int]]:
    """(importer, imported module, line) for every import of `top`.* anywhere in each file."""
    edges = []
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name` imports pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges += [(name, t, node.lineno) for t in dict.fromkeys(targets) if t == top or t.startswith(top + ".")]
    return edges


def unit(module: str) -> str:
    """The top-level module or package a module belongs to: magistune.data.build -> data, magistune -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(edges, layers) -> list[str]:
    return [f"{a} (layer {layers[unit(a)]}) imports {b} (layer {layers[unit(b)]}) at line {line}"
            for a, b, line in edges if unit(a) != unit(b) and layers[unit(b)] >= layers[unit(a)]]


def cycles(edges) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


MODULES = module_files(SRC)
EDGES = imports(MODULES, "magistune")


def test_every_top_level_module_has_a_layer():
    assert {unit(m) for m in MODULES} <= set(LAYERS), "add the new top-level module or package to LAYERS"


def test_no_package_imports_its_own_layer_or_a_higher_one():
    assert EDGES, "no import found: the walk is broken"
    assert layer_violations(EDGES, LAYERS) == []


def test_no_import_cycles():
    assert [sorted(c) for c in cycles(EDGES)] == []


def test_every_import_names_an_existing_module():
    """A function-level import of a moved or deleted module fails only when that function runs: catch it here."""
    missing = [(a, b) for a, b, _ in EDGES if b not in MODULES]
    assert missing == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The same functions on a made-up package: a function-level upward import, a cycle through a relative import."""
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("import pkg.low.a\n")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from pkg.high import g\n    from . import b\n")
    (pkg / "low" / "b.py").write_text("from pkg.low.a import f\n")
    modules = module_files(pkg)
    edges = imports(modules, "pkg")
    assert sorted((a, b) for a, b, _ in edges) == [("pkg.high", "pkg.low.a"), ("pkg.low.a", "pkg.high"),
                                                  ("pkg.low.a", "pkg.low.b"), ("pkg.low.b", "pkg.low.a")]
    assert layer_violations(edges, {"__init__": 0, "low": 1, "high": 2}) == [
        "pkg.low.a (layer 1) imports pkg.high (layer 2) at line 2"]
    assert sorted(map(sorted, cycles(edges))) == [["pkg.high", "pkg.low.a", "pkg.low.b"]]
