#!/usr/bin/env bash
# On the GPU host (see README "GPU host"; the wheels in .whl, trl among them): installs the carried wheels, then
# times one QLoRA GRPO step (1 prompt × G = 8 completions of 512 new tokens) of magistune (--rollout fast: the
# static-cache sampler with its CUDA graph, what the recipe runs on CUDA; --rollout plain: the DynamicCache loop)
# and of TRL's GRPOTrainer (bench/grpo_step.py), each in its own process so that its peak memory is its own, writes
# OUT_DIR/grpo_step.md (bench/report_grpo.py), then runs the gpu test of the CUDA graph if time is left.
# Expected: fast ~1 min, TRL ~2.5 min (an untimed warm-up step and the timed step, ~1 min each), plain ~1.5 min;
# the timeouts keep the whole under 8 min (TRL before plain: the plain row is the one to lose).
# Usage: bash bench/run_grpo_gpu.sh OUT_DIR [LAYERS=40] [PROMPT=256] [NEW=512] [G=8]
set -uo pipefail
out=${1:?out dir}; layers=${2:-40}; prompt=${3:-256}; new=${4:-512}; g=${5:-8}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, accelerate, datasets, bitsandbytes as b, trl
from trl import GRPOTrainer
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'bitsandbytes', b.__version__,
      'trl', trl.__version__, torch.cuda.get_device_name())"
run() {  # NAME TIMEOUT ARGS...: one side in its own process, its log in OUT_DIR
  local name=$1 limit=$2 start=$SECONDS; shift 2
  timeout "$limit" python3 bench/grpo_step.py "$@" --layers "$layers" --prompt "$prompt" --new "$new" \
    --generations "$g" --out "$out/grpo_step.jsonl" > "$out/grpo_step_$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s"
  grep -v -i warn "$out/grpo_step_$name.log" | tail -3 | cut -c1-1500
}
run magistune_fast 100 --side magistune --rollout fast
run trl 200 --side trl
run magistune_plain 140 --side magistune --rollout plain
[ -s "$out/grpo_step.jsonl" ] && python3 bench/report_grpo.py "$out/grpo_step.jsonl"
left=$((465 - SECONDS))
if [ "$left" -ge 45 ]; then
  timeout "$left" python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_gpu_static_generation.py \
    > "$out/gpu_static_generation.txt" 2>&1
  echo "gpu test of the static sampler: exit $?"; tail -3 "$out/gpu_static_generation.txt"
else
  echo "gpu test of the static sampler: skipped ($left s left)"
fi
