#!/usr/bin/env bash
# One GPU session: CUDA parity, train the demo model (time-bounded), evaluate it, benchmark.
# Usage (on the GPU machine, repo root): OUT=/some/dir bash bench/gpu_session.sh MINUTES
# Expects .gpu/parity.safetensors and .gpu/golden_small.npz (a subset of golden_dev.npz).
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
minutes=${1:-6}
device=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
echo "== parity on $device"; timeout 120 python3 bench/cuda_parity.py .gpu/parity.safetensors .gpu/golden_small.npz "$device" || echo "parity FAILED or timed out"
echo "== train"; timeout "$(python3 -c "print(int(float($minutes) * 60 + 90))")" python3 -m cryolens.cli train --out-dir /tmp/demo_run --device "$device" \
  --workers "${WORKERS:-14}" --batch-size "${BATCH:-64}" --lr "${LR:-1.5e-3}" --steps 200000 \
  --max-minutes "$minutes" --checkpoint-every 1000 --quiet --fresh || echo "train FAILED"
cp /tmp/demo_run/final.safetensors /tmp/demo_run/log.jsonl "$OUT"/ 2>/dev/null || cp "$(ls /tmp/demo_run/step_*.safetensors | tail -1)" "$OUT"/final.safetensors
tail -n 2 /tmp/demo_run/log.jsonl
echo "== evaluate"; timeout 120 python3 -m cryolens.cli evaluate -c "$OUT/final.safetensors" --device "$device" --out "$OUT/eval" || echo "evaluate FAILED"
echo "== bench"; timeout 150 python3 bench/engine.py --device "$device" --batches 1 8 32 128 512 --min-time 1 || echo "bench FAILED"
