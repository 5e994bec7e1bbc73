#!/usr/bin/env bash
# Multi-GPU check and benchmark on a host with 2 GPUs (see docs/multi-gpu.md). Installs the carried wheels, runs the
# 2-process tests on the GPUs (FSDP2 / DDP vs one GPU, resume, consolidate; marked gpu), a CLI smoke run through
# --nproc 2, then bench/fsdp_step.py on 1 and 2 GPUs, and prints the table for docs/multi-gpu.md.
# Usage: bash bench/run_fsdp_gpu.sh OUT_DIR [LAYERS_FULL=8] [LAYERS_QLORA=40]
set -uo pipefail
out=${1:?out dir}; full_layers=${2:-8}; qlora_layers=${3:-40}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__, torch.cuda.device_count(), 'GPUs:', torch.cuda.get_device_name())"

echo "== tests/distributed on 2 GPUs (and on CPU)"
python3 -m pytest -q -p no:cacheprovider tests/distributed 2>&1 | tail -15

echo "== CLI: magistune train --nproc 2 (tiny-random, FSDP2 QLoRA in bf16), then consolidate"
python3 -m magistune train bench/configs/tiny-qlora-fsdp-gpu.yaml --nproc 2 2>&1 | grep -v -i warn | tail -8
python3 -m magistune consolidate /tmp/tiny-qlora-fsdp-gpu/checkpoint-6 --output /tmp/tiny-qlora-fsdp-gpu-step6 2>&1 | tail -1

echo "== bench/fsdp_step.py"
run() { n=$1; shift; python3 -m torch.distributed.run --standalone --nproc-per-node "$n" bench/fsdp_step.py "$@" \
          --out "$out/fsdp_step.jsonl" 2>&1 | grep -v -i warn | tail -2; }
run 1 --mode full --layers "$full_layers"
run 2 --mode full --layers "$full_layers"
run 1 --mode qlora --layers "$qlora_layers"
run 2 --mode qlora --layers "$qlora_layers"
run 2 --mode qlora --layers "$qlora_layers" --engine ddp
python3 bench/fsdp_step.py --report "$out/fsdp_step.jsonl" | tee "$out/fsdp_step.md"
