#!/usr/bin/env bash
# Runs on the GPU host: magistune, the stock stack (transformers + PEFT + bitsandbytes) and Unsloth on the same GPU in
# one call, each configuration in its own process (its own peak memory; a failure is printed and the next one runs),
# into OUT/train_step.jsonl, then bench/report.py writes OUT/train_step.md with versions and ratios.
# Usage: bash bench/run_three_gpu.sh OUT "MBSxACCUMxSEQ ..." ["magistune flags[;flags...]"]
#   e.g.  bash bench/run_three_gpu.sh $OUT "2x4x2048 1x1x2048" ";--liger --kernels"   (two magistune rows per shape:
#   the defaults, then liger + the LoRA kernels)
# Environment: ARCHIVE (.whl-bench/bench-site.tar.gz, from bench/wheels_bench.sh), SITE (/tmp/site: emptied and
# filled from ARCHIVE), LAYERS (40), STEPS (3), WARMUP (1), DROPOUT (0.05: magistune and stock), UNSLOTH_DROPOUTS (0.05;
# "0.05 0" gives one Unsloth row each: 2026.10.9 fuses the dropout into its LoRA kernels, and each Unsloth run prints
# how many layers it patched), RUN_TIMEOUT (seconds per process, 300), DEADLINE (570: seconds after which no process
# starts and a running one is stopped, so that the report is written inside a 600-second device call; a run skipped
# for time is printed as SKIPPED), ONLY_INSTALL (set: install and stop).
set -uo pipefail
out=${1:?usage: run_three_gpu.sh OUT "MBSxACCUMxSEQ ..." ["magistune flags"]}
shapes=${2:-"2x4x2048 1x1x2048"}
magistune_flags=${3:-}
archive=${ARCHIVE:-.whl-bench/bench-site.tar.gz}
site=${SITE:-/tmp/site}
layers=${LAYERS:-40}; steps=${STEPS:-3}; warmup=${WARMUP:-1}; dropout=${DROPOUT:-0.05}; unsloth_dropouts=${UNSLOTH_DROPOUTS:-0.05}
run_timeout=${RUN_TIMEOUT:-300}; deadline=${DEADLINE:-570}
for s in $shapes; do
  [[ $s =~ ^[0-9]+x[0-9]+x[0-9]+$ ]] || { echo "bad shape '$s': expected MBSxACCUMxSEQ, e.g. 2x4x2048"; exit 2; }
done
mkdir -p "$out/logs"

# Install: site/ always; each fallback/NAME only where the host itself cannot import NAME (nothing shadowed).
rm -rf "$site" /tmp/bench-archive && mkdir -p "$site" /tmp/bench-archive
tar xzf "$archive" -C /tmp/bench-archive || { echo "cannot unpack $archive"; exit 1; }
cp -a /tmp/bench-archive/site/. "$site/"
for d in /tmp/bench-archive/fallback/*/; do
  name=$(basename "$d")
  if env -u PYTHONPATH python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is not None)"; then
    cp -a "$d." "$site/"; echo "fallback: the host lacks $name; installed the carried one"
  fi
done
[ -n "${ONLY_INSTALL:-}" ] && { echo "installed into $site"; exit 0; }
export PYTHONPATH=$site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, bitsandbytes as b, datasets, trl
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', b.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__, torch.cuda.get_device_name())"

run() {  # run NAME CMD...: one process, its log in OUT/logs, its exit status and last lines printed
  local name=$1; shift
  local start=$SECONDS left=$((deadline - SECONDS))
  if [ $left -lt 30 ]; then echo "== $name: SKIPPED (no time left before the ${deadline} s deadline)"; return; fi
  timeout "$((left < run_timeout ? left : run_timeout))" "$@" > "$out/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s$([ $rc = 0 ] || echo '  FAILED')"
  if [ $rc = 0 ]; then
    grep -i "patched" "$out/logs/$name.log" | tail -2  # Unsloth: how many layers got its fused LoRA kernels
    tail -1 "$out/logs/$name.log"
  else
    grep -v -i warn "$out/logs/$name.log" | tail -25
  fi
}

# The bnb-4bit folder Unsloth loads, saved once (its own process: the build's memory is gone before any timing).
folder=bench/scratch/magistral-small-L$layers-bnb-4bit
run "unsloth-save-L$layers" python3 bench/unsloth_step.py --layers "$layers" --folder "$folder" --save-only
rows=$out/train_step.jsonl
for s in $shapes; do
  IFS=x read -r mbs accum seq <<<"$s"
  common=(--seq "$seq" --mbs "$mbs" --accum "$accum" --layers "$layers" --steps "$steps" --warmup "$warmup" --out "$rows")
  IFS=';' read -r -a variants <<<"$magistune_flags"; [ ${#variants[@]} = 0 ] && variants=("")
  for i in "${!variants[@]}"; do
    # shellcheck disable=SC2086  # the flags are words
    run "magistune$i-$s" python3 bench/train_step.py --side magistune "${common[@]}" --dropout "$dropout" ${variants[$i]}
  done
  run "reference-$s" python3 bench/train_step.py --side reference "${common[@]}" --dropout "$dropout"
  for d in $unsloth_dropouts; do
    run "unsloth-d$d-$s" python3 bench/unsloth_step.py "${common[@]}" --dropout "$d" --folder "$folder"
  done
done
if [ -s "$rows" ]; then python3 bench/report.py "$rows"; else echo "no rows were written"; fi
