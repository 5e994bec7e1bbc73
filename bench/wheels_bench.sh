#!/usr/bin/env bash
# One archive (< 40 MB, about 30) for bench/run_three_gpu.sh: what magistune, the stock stack (transformers + PEFT +
# bitsandbytes) and Unsloth need on the offline CUDA host beyond its own torch 2.11 / transformers 5.17 / peft /
# accelerate / triton / numpy (and what wheels.sh says is there: safetensors, pillow, pyyaml, rich, tqdm, pyarrow,
# pandas, fsspec, xxhash, huggingface-hub). Usage: bash bench/wheels_bench.sh DIR   → DIR/bench-site.tar.gz
#
# Unpacked wheels, pruned, as a folder tree:
#   site/      always goes into /tmp/site: our wheels (../shared/gpu/wheels.sh's list) but datasets 4.8.5 and
#              trl 1.15.0 (Unsloth 2026.10.9 refuses newer ones), unsloth without its unused studio/ (82 MB),
#              unsloth_zoo, bitsandbytes with only its CPU and CUDA 13 libraries (the wheel carries 11 CUDA/ROCm/XPU
#              builds: 43 MB → 8 MB unpacked).
#   fallback/NAME/  one import name each (requests and httpx with theirs): run_three_gpu.sh copies one into
#              /tmp/site only when the host cannot import NAME, so nothing of the host's is shadowed.
# The list comes from the packages' Requires-Dist and from their module-level imports (tests/bench/
# test_bench_wheels.py checks the built archive against those imports).
set -euo pipefail
dir=${1:?usage: bench/wheels_bench.sh DIR}
wheels=$(mktemp -d)  # not under DIR: DIR is what the device call carries
trap 'rm -rf "$wheels"' EXIT
mkdir -p "$dir"
site_pkgs=(
  mistral-common==1.13.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
  typing-inspection==0.4.2 pydantic-extra-types==2.11.0 pycountry==24.6.1
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
  datasets==4.8.5 dill==0.4.0 multiprocess==0.70.18
  bitsandbytes==0.50.2 cut-cross-entropy==25.1.1 liger-kernel==0.8.5
  trl==1.15.0 unsloth==2026.10.9 unsloth-zoo==2026.10.9
)
fallback_pkgs=(  # datasets 4.8.5 imports requests and httpx at module level (datasets 5 dropped requests)
  requests==2.32.5 urllib3==2.5.0 idna==3.10 charset-normalizer==3.4.3 certifi==2025.8.3
  httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.11.0 sniffio==1.3.1
)
plat=()
for n in 28 27 24 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for p in "${site_pkgs[@]}" "${fallback_pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$wheels" "$p" 2>&1 | grep -v "is ignored: it is neither" || true
done
python3 - "$dir" "$wheels" "${site_pkgs[*]}" "${fallback_pkgs[*]}" <<'EOF'
import re, shutil, sys, tarfile, zipfile
from pathlib import Path

out, wheel_dir, site_pkgs, fallback_pkgs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
stage = wheel_dir / "stage"
shutil.rmtree(stage, ignore_errors=True)
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wheels = {norm(w.name.split("-")[0]) + "==" + w.name.split("-")[1]: w for w in wheel_dir.glob("*.whl")}
KEEP_BNB = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")

def unpack(spec: str, dest: Path) -> list[str]:
    name, version = spec.split("==")
    wheel = wheels[norm(name) + "==" + version]  # KeyError: pip download did not bring it
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if not m.startswith("studio/")
                   and not (m.startswith("bitsandbytes/libbitsandbytes_") and not KEEP_BNB.search(m))]
        z.extractall(dest, members)
    return sorted({m.split("/")[0] for m in members})

for spec in site_pkgs:
    unpack(spec, stage / "site")
for spec in fallback_pkgs:
    tops = unpack(spec, stage / "tmp")
    name = [t for t in tops if not t.endswith((".dist-info", ".data"))][0].removesuffix(".py")
    (stage / "fallback" / name).mkdir(parents=True)
    for t in tops:
        shutil.move(stage / "tmp" / t, stage / "fallback" / name / t)
shutil.rmtree(stage / "tmp")
assert not (stage / "site" / "studio").exists()
archive = out / "bench-site.tar.gz"
with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
    for top in ("site", "fallback"):
        tar.add(stage / top, arcname=top, filter=lambda ti: None if "__pycache__" in ti.name else ti)
shutil.rmtree(stage)
size = archive.stat().st_size
print(f"{archive}: {size / 1e6:.1f} MB ({len(site_pkgs)} packages in site/, {len(fallback_pkgs)} in fallback/)")
assert size < 40e6, "over the 40 MB budget (a call carries 64 MiB in all)"
EOF
