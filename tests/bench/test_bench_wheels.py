"""bench/wheels_bench.sh, bench/archive_imports.py and bench/run_three_gpu.sh: the archive's package list, the
static import walk, and (when the archive has been built: .whl-bench/bench-site.tar.gz, or $BENCH_ARCHIVE) that
everything the three sides import is in it or on the host, and that run_three_gpu.sh installs it."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from archive_imports import HOST, module_level_imports, outside_imports, unpack  # noqa: E402

ARCHIVE = Path(os.environ.get("BENCH_ARCHIVE", REPO / ".whl-bench" / "bench-site.tar.gz"))
needs_archive = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} not built (bash bench/wheels_bench.sh .whl-bench)")


def pins(script: Path, array: str) -> dict[str, str]:
    body = re.search(rf"^{array}=\((.*?)^\)", script.read_text(), re.S | re.M).group(1)
    body = "\n".join(line.split("#")[0] for line in body.splitlines())
    return dict(p.split("==") for p in body.split())


def test_package_list_is_ours_with_unsloth_s_pins():
    site = pins(REPO / "bench" / "wheels_bench.sh", "site_pkgs")
    assert (site["unsloth"], site["unsloth-zoo"], site["trl"], site["datasets"]) == ("2026.10.9", "2026.10.9", "1.15.0", "4.8.5")
    for name in ("mistral-common", "pydantic", "pydantic-core", "bitsandbytes", "cut-cross-entropy", "liger-kernel", "dill", "multiprocess"):
        assert name in site, name
    assert not {"torch", "transformers", "peft", "accelerate", "triton", "numpy", "xformers", "flash-attn"} & set(site)
    shared = REPO.parent / "shared" / "gpu" / "wheels.sh"
    if shared.is_file():  # the wheelhouse the other benchmarks carry: the same packages, datasets and trl older
        theirs = pins(shared, "pkgs")
        assert set(theirs) <= set(site)
        assert {k for k in theirs if theirs[k] != site[k]} <= {"datasets", "trl"}


def test_import_walk_sees_guards_ifs_and_functions():
    source = """
import a
from b.c import d
try:
    import e
except ImportError:
    import f
with suppress(ImportError):
    import g
if HAS_H:
    import h
def later():
    import i
class K:
    import j
"""
    found = {(n.names[0].name if n.__class__.__name__ == "Import" else n.module): (guarded, under_if)
             for n, guarded, under_if in module_level_imports(source)}
    assert found == {"a": (False, False), "b.c": (False, False), "e": (True, False), "f": (True, False),
                     "g": (True, False), "h": (False, True), "j": (False, False)}


def test_import_walk_follows_local_modules(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .sub import x\nif GPU:\n    from ._gpu import *\n")
    (tmp_path / "pkg" / "sub.py").write_text("import needed\nimport os\n")
    (tmp_path / "pkg" / "_gpu.py").write_text("import gpu_only\n")
    (tmp_path / "pkg" / "unused.py").write_text("import never\n")
    assert outside_imports(tmp_path, ["pkg"]) == {"needed": ("pkg.sub", False), "gpu_only": ("pkg._gpu", False)}


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    return unpack(ARCHIVE, tmp_path_factory.mktemp("archive"))


@needs_archive
def test_archive_holds_what_the_sides_import(unpacked):
    fallback = {p.name for p in (unpacked / "fallback").iterdir()}
    missing = {name: module for name, (module, under_if) in outside_imports(unpacked / "site").items()
               if not under_if and name not in HOST and name not in fallback}
    assert not missing, missing  # {package: a module that imports it}
    assert {"requests", "urllib3", "httpx", "httpcore"} <= fallback


@needs_archive
def test_archive_is_pruned_and_pinned(unpacked):
    site = unpacked / "site"
    assert ARCHIVE.stat().st_size < 40e6
    assert not (site / "studio").exists() and (site / "unsloth" / "__init__.py").is_file()
    libs = sorted(p.name for p in (site / "bitsandbytes").glob("libbitsandbytes_*.so"))
    assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
    for dist in ("unsloth-2026.10.9", "unsloth_zoo-2026.10.9", "trl-1.15.0", "datasets-4.8.5", "bitsandbytes-0.50.2"):
        assert (site / f"{dist}.dist-info").is_dir(), dist
    with tarfile.open(ARCHIVE) as tar:
        names = tar.getnames()
    assert all(n.split("/")[0] in ("site", "fallback") and "__pycache__" not in n for n in names)


def _run_three(*args, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {}), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(REPO / "bench" / "run_three_gpu.sh"), *args], check=False,
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_run_three_refuses_a_bad_shape_before_doing_anything(tmp_path):
    proc = _run_three(str(tmp_path / "out"), "2x4x2048 2x4", env_extra={"SITE": str(tmp_path / "site")})
    assert proc.returncode == 2 and "bad shape '2x4'" in proc.stdout
    assert not (tmp_path / "site").exists()


@needs_archive
def test_run_three_installs_site_and_only_the_missing_fallbacks(tmp_path):
    site = tmp_path / "site"
    proc = _run_three(str(tmp_path / "out"), env_extra={"ARCHIVE": str(ARCHIVE), "SITE": str(site), "ONLY_INSTALL": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "unsloth").is_dir() and (site / "datasets-4.8.5.dist-info").is_dir()
    import importlib.util

    for name in ("requests", "urllib3", "httpx", "httpcore", "h11", "anyio", "idna", "certifi"):
        host_has = importlib.util.find_spec(name) is not None  # this python3 plays the host
        assert (site / name).exists() != host_has, name
        assert (f"the host lacks {name};" in proc.stdout) != host_has, name
