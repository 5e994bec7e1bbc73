#!/usr/bin/env bash
# Runs on the GPU host (see README "GPU host"; the wheels in .whl, trl among them): installs the carried wheels,
# then times a QLoRA DPO step of magistune and of TRL's DPOTrainer (bench/dpo_step.py), each side in its own
# process so that its peak memory is its own, and writes OUT_DIR/dpo_step.md (bench/report_dpo.py).
# Usage: bash bench/run_dpo_gpu.sh OUT_DIR [LAYERS=40] [STEPS=4] [PROMPT=1024] [ANSWER=1024]
set -uo pipefail
out=${1:?out dir}; layers=${2:-40}; steps=${3:-4}; prompt=${4:-1024}; answer=${5:-1024}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, accelerate, datasets, pyarrow, bitsandbytes as b, trl
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__,
      'bitsandbytes', b.__version__, 'trl', trl.__version__, torch.cuda.get_device_name())"
for side in magistune trl; do
  start=$SECONDS
  timeout 280 python3 bench/dpo_step.py --side "$side" --layers "$layers" --steps "$steps" --prompt "$prompt" \
    --answer "$answer" --out "$out/dpo_step.jsonl" > "$out/dpo_step_$side.log" 2>&1
  echo "$side: exit $? after $((SECONDS - start)) s"
  grep -v -i warn "$out/dpo_step_$side.log" | tail -4
done
[ -s "$out/dpo_step.jsonl" ] && python3 bench/report_dpo.py "$out/dpo_step.jsonl"
