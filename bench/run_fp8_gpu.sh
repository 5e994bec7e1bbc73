#!/usr/bin/env bash
# Runs on the GPU host (see README "GPU host"): base_fp8 (model/fp8.py) on an FP8 GPU, in two parts that each fit
# one 10-minute call.
#   accuracy: the GPU tests (tests/gpu/test_gpu_fp8.py), then bench/fp8_accuracy.py on a 4-layer real-shape cut
#             (LoRA gradient cosine, 50-step loss curves against bf16, a bf16 repeat, product timings)
#             → OUT/fp8_tests.log, OUT/fp8_accuracy.json
#   speed:    bench/train_step.py on the 40-layer model, seq 2048: 1×1 without and with --fp8, and 2×4 with --fp8
#             (each run in its own process) → OUT/train_step.jsonl
# Usage: bash bench/run_fp8_gpu.sh OUT_DIR accuracy|speed [extra train_step runs as "mbs:accum:flags" ...]
set -uo pipefail
out=${1:?out dir}; part=${2:?accuracy or speed}; shift 2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, bitsandbytes as b; print(torch.__version__, b.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
if [ "$part" = accuracy ]; then
  start=$SECONDS
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_gpu_fp8.py > "$out/fp8_tests.log" 2>&1
  echo "tests: exit $? after $((SECONDS - start)) s"; tail -8 "$out/fp8_tests.log"
  start=$SECONDS
  timeout 300 python3 bench/fp8_accuracy.py --out "$out/fp8_accuracy.json" > "$out/fp8_accuracy.log" 2>&1
  echo "fp8_accuracy: exit $? after $((SECONDS - start)) s"
  python3 - "$out/fp8_accuracy.json" <<'PY' || tail -5 "$out/fp8_accuracy.log"
import json, sys
r = json.load(open(sys.argv[1]))
for name, p in r["paths"].items():
    keep = {k: p[k] for k in ("error", "tokens_per_s", "peak_gib", "grad_cosine", "loss_rel_diff_pct", "loss_drop") if k in p}
    print(name, json.dumps(keep))
for m in r.get("matmul", []):
    t = m["ms"]
    print(m["proj"], m["n"], m["k"], "bf16", t["bf16_fwd"], "fp8", t["fp8_fwd"], "gemm", t["fp8_gemm_only"],
          "TF/s", t["gemm_tflops"], "vs bnb", t["base_fp8_over_bnb"], "fastacc err", t["fast_accum_rel_err"])
PY
elif [ "$part" = speed ]; then
  runs=("1:1:" "1:1:fp8" "2:4:fp8" "$@")
  for r in "${runs[@]}"; do
    IFS=: read -r mbs accum flag <<<"$r"
    flags=(); for f in ${flag//,/ }; do flags+=("--$f"); done
    start=$SECONDS
    timeout 280 python3 bench/train_step.py --side magistune --seq 2048 --mbs "$mbs" --accum "$accum" "${flags[@]}" \
      --out "$out/train_step.jsonl" 2>&1 | grep -v -i warn | tail -2
    echo "$r: $((SECONDS - start)) s"
  done
else
  echo "part must be accuracy or speed"; exit 2
fi
