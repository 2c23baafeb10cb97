#!/usr/bin/env bash
# The checks a session runs on a lent GPU machine, in one call (device time is short):
#
#   bash benchmarks/device_check.sh OUT_DIR [WORLD]
#
# WORLD: the ranks for steps 2-4 (default: one per GPU, at least 2).
# 1. the README's main job on CUDA, one rank: stage 2 fp32, stage 3 fp16 + GradScaler;
# 2. whether WORLD ranks can run over NCCL here (with fewer GPUs they share them:
#    compare.join_group), else one rank;
# 3. benchmarks/device_agreement.py: zeroshard against DDP on CUDA/NCCL (bitwise at
#    two ranks; see its docstring for more);
# 4. benchmarks/compare.py against the peers (memory per process; times only where
#    each rank has a GPU of its own).
# Writes log.txt, agreement.{md,json} and results.{md,json,png} into OUT_DIR. Needs
# nothing installed beyond torch (zeroshard runs from this checkout). A dry run works
# on CPU too (gloo, no GPU figures).
set -uo pipefail
out=${1:?usage: bash benchmarks/device_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python=$(command -v python3 || command -v python)
log="$out/log.txt"
exec > >(tee -a "$log") 2>&1

echo "== machine"
nvidia-smi -L || echo "no nvidia-smi"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'gpus', torch.cuda.device_count(),
      'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"

echo "== 1. examples/train_gpt.py, one rank"
for run in "--stage 2" "--stage 3 --precision fp16"; do
  echo "-- $run"
  # shellcheck disable=SC2086
  timeout 150 torchrun --standalone --nproc_per_node=1 examples/train_gpt.py $run --steps 100 \
    | tr '\r' '\n' | tail -4
  echo "exit ${PIPESTATUS[0]}"
done

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
world=${2:-$(( gpus > 2 ? gpus : 2 ))}
echo "== 2. $world ranks on this machine's devices"
timeout 90 "$python" benchmarks/device_agreement.py --probe --world-size "$world" --timeout 60 || world=1
echo "world size for the rest: $world"

echo "== 3. benchmarks/device_agreement.py"
timeout 240 "$python" benchmarks/device_agreement.py --world-size "$world" --timeout 200 --out "$out"
echo "exit $?"

echo "== 4. benchmarks/compare.py"
timeout 330 "$python" benchmarks/compare.py --world-size "$world" --timeout 90 --out "$out" \
  --methods ddp,ddp+zero_redundancy,fsdp1_full_shard,fsdp2_no_reshard,fsdp2_reshard,zeroshard1,zeroshard2,zeroshard3
echo "exit $?"
