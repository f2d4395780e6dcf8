#!/usr/bin/env bash
# The engine's GPU check (issue #13): CUDA tests, CUDA parity on the golden fixtures (exact and
# device z-score), bench/engine.py --device cuda at batch 1-2048 (throughput, GPU busy share,
# host<->device GB/s, the costliest kernels; e55c00d's engine alongside for before/after), the
# HTTP bench, then experiments (cuDNN autotuner, channels-last, torch.compile) and chunk sizes.
# Everything is bounded by one deadline: under 8 minutes (CHECK_SECONDS, default 450).
#
# Prepare once where ../shared/parity exists (writes .gpu/, about 40 MB, untracked; the device
# run tool copies untracked files, or name .gpu in its carry list if you ignore it):
#     bash bench/gpu_check.sh --prepare [SHARED_DIR]
# Then on the GPU machine, in the repository root:
#     OUT=/some/dir bash bench/gpu_check.sh          # DEVICE=cpu does a dry run anywhere
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
device=${DEVICE:-cuda}

if [ "${1:-}" = "--prepare" ]; then
  shared=${2:-${CRYOLENS_SHARED:-../shared}}
  mkdir -p .gpu
  git show e55c00d:src/cryolens/engine.py > .gpu/engine_e55c00d.py
  "$PY" - "$shared/parity" <<'PYEOF'
import sys

import numpy as np
from safetensors.torch import save_file

from cryolens.checkpoints import load_model

parity = sys.argv[1]
model, _ = load_model(f"{parity}/v001_random_lightning.ckpt", device="cpu")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ".gpu/parity.safetensors")
keys = ["inputs", "names", "mu", "log_var", "pose_raw", "quaternion", "global_weight",
        "dec_id_conv", "seg_id_affinity_conv", "seg_id_free_conv", "recon_pipeline", "norm_std",
        "norm_mean", "explicit_pose", "explicit_gw", "dec_pred_conv", "dec_explicit_conv",
        "zsweep_z", "zsweep_pose", "zsweep_gw", "zsweep_conv"]
with np.load(f"{parity}/golden_dev.npz") as golden:
    np.savez(".gpu/golden_small.npz", **{k: golden[k] for k in keys})
print("wrote .gpu/parity.safetensors, .gpu/golden_small.npz, .gpu/engine_e55c00d.py")
PYEOF
  exit $?
fi

deadline=$((SECONDS + ${CHECK_SECONDS:-450}))
log=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$log") 2>&1
# step NAME MAX_SECONDS CMD...: runs CMD under the smaller of MAX_SECONDS and the time left.
step() {
  local name=$1 most=$2 left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt 20 ]; then echo "== $name: SKIPPED (deadline)"; return; fi
  [ "$most" -gt "$left" ] && most=$left
  echo "== $name (at most ${most}s)"
  local start=$SECONDS
  timeout "$most" "$@" || echo "== $name: FAILED or timed out (rc $?)"
  echo "== $name took $((SECONDS - start))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
[ -f .gpu/parity.safetensors ] || echo "no .gpu/: run 'bash bench/gpu_check.sh --prepare' first"

step "tests: the CUDA ones" 60 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_engine_tensors.py

step "parity: exact z-score (all inputs) and device z-score (constant input apart)" 80 \
  "$PY" - "$device" <<'PYEOF'
import sys

import numpy as np

sys.path.insert(0, "bench")
import cuda_parity  # noqa: E402

from cryolens.engine import Engine  # noqa: E402

device = sys.argv[1]
golden = dict(np.load(".gpu/golden_small.npz"))
constant = [i for i, name in enumerate(golden["names"]) if "constant" in str(name)]


def engine_with(exact: bool) -> type:
    class Chosen(Engine):
        @classmethod
        def from_checkpoint(cls, *args, **kwargs):
            return Engine.from_checkpoint(*args, exact_zscore=exact, **kwargs)
    return Chosen


print("-- exact_zscore=True (numpy z-score on the host): every golden input")
cuda_parity.Engine = engine_with(True)
failed = cuda_parity.main(".gpu/parity.safetensors", ".gpu/golden_small.npz", device)
print("-- exact_zscore=False (the CUDA default: z-score on the device): all inputs but the "
      "constant one", constant)
per_input = {"inputs", "mu", "log_var", "pose_raw", "quaternion", "global_weight", "dec_id_conv",
             "seg_id_affinity_conv", "seg_id_free_conv", "recon_pipeline", "norm_std", "norm_mean",
             "explicit_pose", "explicit_gw", "dec_pred_conv", "dec_explicit_conv", "names"}
keep = [i for i in range(len(golden["inputs"])) if i not in constant]
np.savez("/tmp/golden_no_constant.npz",
         **{k: v[keep] if k in per_input else v for k, v in golden.items()})
cuda_parity.Engine = engine_with(False)
failed += cuda_parity.main(".gpu/parity.safetensors", "/tmp/golden_no_constant.npz", device)
engine = Engine.from_checkpoint(".gpu/parity.safetensors", device=device, exact_zscore=False)
for i in constant:
    f = engine.features(golden["inputs"][i:i + 1])
    print(f"constant input {i}: device z-score gives 0 (numpy float32: rounding residue); "
          f"mu differs from the reference by {np.abs(f.embedding - golden['mu'][i]).max():.2e} "
          "(expected: spec.md c.1)")
sys.exit(1 if failed else 0)
PYEOF

old=()
[ -f .gpu/engine_e55c00d.py ] && old=(--compare .gpu/engine_e55c00d.py --rounds 1)
step "bench: numpy in/out, new and e55c00d" 170 "$PY" bench/engine.py --device "$device" \
  --batches 1 32 128 512 2048 --min-time 1 --kernels 6 "${old[@]}"
step "bench: tensors already on the device, where the GPU's time goes" 70 "$PY" bench/engine.py \
  --device "$device" --input tensor --batches 32 512 2048 --min-time 1 --kernels 15
step "server over loopback" 80 "$PY" bench/http.py --device "$device" --seconds 2 --count 10 \
  --no-litserve
# Experiments the engine does not make: each against the tensor figures above (same batch).
for variant in cudnn-benchmark channels-last compile; do
  most=40
  [ "$variant" = compile ] && most=120
  step "experiment: $variant, tensors at batch 2048" "$most" "$PY" bench/engine.py \
    --device "$device" --input tensor --batches 2048 --min-time 1 --no-segments \
    --variant "$variant" --kernels 8
done
for chunk in 128 512; do
  step "bench: max_chunk $chunk at batch 2048" 40 "$PY" bench/engine.py --device "$device" \
    --batches 2048 --min-time 1 --no-segments --max-chunk "$chunk" --memory-budget $((16 * 1024**3))
done
echo "== done in $((SECONDS - deadline + ${CHECK_SECONDS:-450}))s"
