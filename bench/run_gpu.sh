#!/usr/bin/env bash
# Runs on the GPU host (see README "GPU host"): installs the carried wheels, smoke-trains the tiny model through
# the CLI on CUDA, then times each configuration of bench/train_step.py in its own process.
# Usage: bash bench/run_gpu.sh OUT_DIR "side:seq:mbs:accum[:layers[:flag,flag...]] ..."
#   flags are train_step.py options without the dashes: vision, packing, random-lengths, cce, offload, attn=flex_attention
set -uo pipefail
out=${1:?out dir}; shift
runs=${1:-"magistune:2048:2:4 reference:2048:2:4"}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__, torch.cuda.get_device_name())"
for r in $runs; do
  IFS=: read -r side seq mbs accum layers flag <<<"$r"
  flags=(); for f in ${flag//,/ }; do flags+=("--$f"); done
  python3 bench/train_step.py --side "$side" --seq "$seq" --mbs "$mbs" --accum "$accum" --layers "${layers:-40}" \
    "${flags[@]}" --out "$out/train_step.jsonl" 2>&1 | grep -v -i warn | tail -3
done
