"""What the packages in bench/wheels_bench.sh's archive import when they are imported: a static check.

    python bench/archive_imports.py .whl-bench/bench-site.tar.gz

Follows the module-level imports (not those inside functions, nor those under try/except ImportError) from the
entry points below through the archive's own packages, and prints each outside package reached with a module that
reaches it. tests/bench/test_bench_wheels.py asserts that each is in the archive or on the host (HOST), unless it is
only ever imported under an `if` (`if is_wandb_available():`, `if HAS_FLASH_ATTENTION:`, …): those are listed as
such, and they are optional extras (vllm, wandb, flash_attn, torchao, …), not what a plain import needs.
"""

from __future__ import annotations

import ast
import sys
import tarfile
import tempfile
from pathlib import Path

ENTRY_POINTS = ("unsloth", "unsloth_zoo", "trl", "trl.trainer.sft_trainer", "datasets", "bitsandbytes",
                "mistral_common.protocol.instruct.request", "mistral_common.tokens.tokenizers.mistral",
                "pydantic", "cut_cross_entropy", "liger_kernel.ops.rms_norm", "liger_kernel.ops.swiglu")
# On the host already (its torch, transformers, peft, accelerate, triton, numpy; what ../shared/gpu/wheels.sh says
# is there; and what those require per their Requires-Dist).
HOST = {"torch", "transformers", "peft", "accelerate", "triton", "numpy", "safetensors", "PIL", "tiktoken", "yaml",
        "rich", "tqdm", "pyarrow", "pandas", "fsspec", "xxhash", "huggingface_hub", "filelock", "typing_extensions",
        "sympy", "networkx", "jinja2", "packaging", "regex", "tokenizers", "psutil",
        "attrs"}  # attrs: jsonschema's; the .whl wheelhouse (jsonschema without attrs) already runs on the host


def module_file(root: Path, module: str) -> tuple[Path | None, bool]:
    p = root.joinpath(*module.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py", True
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py"), False
    return None, False


def _catches_import_error(node: ast.Try) -> bool:
    names = ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")
    for h in node.handlers:
        types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if h.type is None or any(isinstance(t, ast.Name) and t.id in names for t in types):
            return True
    return False


def module_level_imports(source: str) -> list[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """(import statement, guarded by try/except ImportError, under an `if`) for each import outside functions."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool, bool]] = []

    def walk(nodes: list[ast.stmt], guarded: bool, under_if: bool) -> None:
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(n, ast.Try):  # the body, and the fallbacks of an except ImportError, may fail
                catches = _catches_import_error(n)
                walk(n.body, guarded or catches, under_if)
                for part in (n.orelse, n.finalbody):
                    walk(part, guarded, under_if)
                for h in n.handlers:
                    walk(h.body, guarded or catches, under_if)
                continue
            if isinstance(n, ast.With) and any("suppress" in ast.unparse(w.context_expr) and "ImportError"
                                               in ast.unparse(w.context_expr) for w in n.items):
                walk(n.body, True, under_if)  # with contextlib.suppress(ImportError): import x
                continue
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                found.append((n, guarded, under_if))
            for field in ("body", "orelse"):
                if isinstance(getattr(n, field, None), list):
                    walk(getattr(n, field), guarded, under_if or isinstance(n, ast.If))

    walk(ast.parse(source).body, False, False)
    return found


def outside_imports(root: Path, entry_points=ENTRY_POINTS) -> dict[str, tuple[str, bool]]:
    """{outside top-level package: (a module of the archive that imports it unguarded, only ever under an `if`)}.
    Local modules are followed under an `if` too (`if cuda: from ._gpu_init import *`)."""
    local = {p.name.removesuffix(".py") for p in root.iterdir() if not p.name.endswith((".dist-info", ".data"))}
    seen: set[str] = set()
    todo = list(entry_points)
    outside: dict[str, tuple[str, bool]] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path, is_package = module_file(root, module)
        if path is None:
            continue
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        package = parts if is_package else parts[:-1]
        for node, guarded, under_if in module_level_imports(path.read_text(encoding="utf-8", errors="replace")):
            if guarded:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                top = target.split(".")[0]
                if not top or top in sys.stdlib_module_names or top == "__main__":
                    continue
                if top in local:
                    todo.append(target)
                elif (target == targets[0] or isinstance(node, ast.Import)) and outside.get(top, ("", True))[1]:
                    outside[top] = (module, under_if)
    return outside


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(Path(sys.argv[1]), Path(tmp))
        fallback = {p.name for p in (root / "fallback").iterdir()}
        for name, (module, under_if) in sorted(outside_imports(root / "site").items()):
            where = ("fallback" if name in fallback else "host" if name in HOST else "under an if" if under_if
                     else "MISSING")
            print(f"{name:24} {where:12} (from {module})")
