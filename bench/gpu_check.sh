#!/usr/bin/env bash
# The engine's GPU check (issue #13): CUDA tests, CUDA parity on the golden fixtures (exact and
# device z-score; the fused render in its default precision and in plain float32),
# bench/engine.py --device cuda at batch 1-2048 (throughput, GPU busy share, host<->device GB/s,
# the costliest kernels), the same for the source tree of an earlier commit (before/after in one
# run), the HTTP bench, then experiments (other renders, torch.compile) and chunk sizes.
# Everything is bounded by one deadline: under 8 minutes (CHECK_SECONDS, default 450).
#
# Prepare once where ../shared/parity exists (writes .gpu/, about 48 MB, git-ignored: name .gpu
# in the device run tool's carry list, with .whl for the packages the machine lacks). BEFORE
# names the commit whose engine is measured as "before" (default: the one before issue #13's
# GPU work was measured):
#     BEFORE=d6f1275 bash bench/gpu_check.sh --prepare [SHARED_DIR]
# Then on the GPU machine, in the repository root:
#     OUT=/some/dir bash bench/gpu_check.sh          # DEVICE=cpu does a dry run anywhere
set -u
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
device=${DEVICE:-cuda}

if [ "${1:-}" = "--prepare" ]; then
  shared=${2:-${CRYOLENS_SHARED:-../shared}}
  mkdir -p .gpu
  rm -rf .gpu/before && mkdir -p .gpu/before
  git archive "${BEFORE:-d6f1275}" src/cryolens | tar -x -C .gpu/before \
    --exclude='src/cryolens/data/*.safetensors' --exclude='src/cryolens/server/static'
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
    np.savez_compressed(".gpu/golden_small.npz", **{k: golden[k] for k in keys})
print("wrote .gpu/parity.safetensors, .gpu/golden_small.npz and .gpu/before/")
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
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "no triton: cuBLAS renders"
[ -f .gpu/parity.safetensors ] || echo "no .gpu/: run 'bash bench/gpu_check.sh --prepare' first"

step "tests: the CUDA ones" 90 "$PY" -m pytest -q -p no:cacheprovider --disable-warnings \
  -k "cuda or interpreter" \
  tests/test_engine_tensors.py tests/test_render_kernel.py

step "parity: each render, exact z-score (all inputs) and device z-score (constant input apart)" \
  90 "$PY" - "$device" <<'PYEOF'
import sys

import numpy as np

sys.path.insert(0, "bench")
import cuda_parity  # noqa: E402

from cryolens.engine import Engine  # noqa: E402
from cryolens.model import render  # noqa: E402

device = sys.argv[1]
golden = dict(np.load(".gpu/golden_small.npz"))
constant = [i for i, name in enumerate(golden["names"]) if "constant" in str(name)]
per_input = {"inputs", "mu", "log_var", "pose_raw", "quaternion", "global_weight", "dec_id_conv",
             "seg_id_affinity_conv", "seg_id_free_conv", "recon_pipeline", "norm_std", "norm_mean",
             "explicit_pose", "explicit_gw", "dec_pred_conv", "dec_explicit_conv", "names"}
keep = [i for i in range(len(golden["inputs"])) if i not in constant]
np.savez("/tmp/golden_no_constant.npz",
         **{k: v[keep] if k in per_input else v for k, v in golden.items()})


def engine_with(exact: bool) -> type:
    class Chosen(Engine):
        @classmethod
        def from_checkpoint(cls, *args, **kwargs):
            return Engine.from_checkpoint(*args, exact_zscore=exact, **kwargs)
    return Chosen


failed = 0
import torch  # noqa: E402

for mode in ("auto", "ieee", "cublas"):
    render.GPU_RENDER = mode
    print(f"---- GPU_RENDER={mode}: renders with "
          f"{render.fused_precision(torch.device(device)) or 'cuBLAS'}")
    print("-- exact_zscore=True (numpy z-score on the host): every golden input")
    cuda_parity.Engine = engine_with(True)
    failed += cuda_parity.main(".gpu/parity.safetensors", ".gpu/golden_small.npz", device)
    print("-- exact_zscore=False (the CUDA default: z-score on the device): all inputs but the "
          "constant one", constant)
    cuda_parity.Engine = engine_with(False)
    failed += cuda_parity.main(".gpu/parity.safetensors", "/tmp/golden_no_constant.npz", device)
render.GPU_RENDER = "auto"
engine = Engine.from_checkpoint(".gpu/parity.safetensors", device=device, exact_zscore=False)
for i in constant:
    f = engine.features(golden["inputs"][i:i + 1])
    print(f"constant input {i}: mu differs from the reference by "
          f"{np.abs(f.embedding - golden['mu'][i]).max():.2e} (expected: spec.md c.1)")
print("kernel failures:", render._KERNEL_FAILED or "none")
sys.exit(1 if failed else 0)
PYEOF

bench=("$PY" bench/engine.py --device "$device" --min-time 1)
before=(env "PYTHONPATH=$PWD/.gpu/before/src${PYTHONPATH#"$PWD"/src}" "${bench[@]}")
step "bench: numpy in/out, after" 80 "${bench[@]}" --batches 1 32 128 512 2048 --kernels 8
step "bench: tensors on the device, after" 50 "${bench[@]}" --input tensor --batches 32 512 2048 \
  --kernels 15
step "bench: numpy in/out, before" 60 "${before[@]}" --batches 32 512 2048
step "bench: tensors on the device, before" 30 "${before[@]}" --input tensor --batches 2048
for chunk in 256 1024; do
  step "bench: numpy, max_chunk $chunk at batch 2048" 30 "${bench[@]}" --batches 2048 \
    --no-segments --max-chunk "$chunk" --memory-budget $((16 * 1024**3))
done
for variant in ieee-render cublas-render; do
  step "experiment: $variant, tensors at batch 2048" 30 "${bench[@]}" --input tensor \
    --batches 2048 --no-segments --variant "$variant" --kernels 6
  step "experiment: $variant, numpy at batch 2048" 30 "${bench[@]}" --batches 2048 \
    --no-segments --variant "$variant"
done
step "server over loopback" 80 "$PY" bench/http.py --device "$device" --seconds 2 --count 10 \
  --no-litserve
step "experiment: compile, tensors at batch 2048" 100 "${bench[@]}" --input tensor \
  --batches 2048 --no-segments --variant compile --kernels 8
echo "== done in $((SECONDS - deadline + ${CHECK_SECONDS:-450}))s"
