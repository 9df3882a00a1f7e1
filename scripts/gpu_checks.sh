#!/usr/bin/env bash
# Every check that needs a GPU, in one command (run from the repo root on a GPU machine):
#
#   bash scripts/gpu_checks.sh [OUT_DIR]        # default OUT_DIR: benchmarks/raw-$(date +%F)
#
# 1. the GPU-marked tests (the compiled fused NF4 kernel against the reference path);
# 2. the fused kernel against the reference path at 1, 16 and 64 tokens, LLaMA-2-7B shapes
#    (per linear, whole backbone, batch-1 decode), and at 1 token for the 70B linears;
# 3. QST (adapter, maxpool), QLoRA and the backbone forward at LLaMA-2-7B shape, B16 x T512;
# 4. the sharded step on a one-device mesh against the unsharded step (run last);
# 5. the steps of 3 with the frozen layers streamed from pinned host memory.
# Each writes JSON lines under OUT_DIR and prints its table; the peers' figures
# come from ../shared/anchors/ (see its README) in the same session.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/raw-$(date +%F)}"
mkdir -p "$out"
python=${PYTHON:-python3}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "commit $commit, device: $($python -c 'import jax; print(jax.devices()[0].device_kind)')" | tee "$out/meta.txt"

$python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.txt"
$python scripts/kernel_benchmark.py --shape 7b --tokens 1,16,64 --decode 128 --out "$out/kernel.jsonl" \
  | tee "$out/kernel.txt"
$python scripts/kernel_benchmark.py --shape 70b --tokens 1 --skip-forward --out "$out/kernel.jsonl" \
  | tee "$out/kernel_70b.txt"
$python scripts/benchmark.py --shape 7b --batch 16 --seq 512 \
  --methods forward,qst:adapter,qst:maxpool,qlora --out "$out/benchmark.jsonl" | tee "$out/benchmark.txt"
# 5. the same steps with the frozen layers streamed from pinned host memory (model.offload=weights), then with
# QST's kept states on the host too, then with XLA's auto-PGLE (measured latencies let its scheduler overlap the
# host copies with compute; the deviceless schedule does not: docs/performance.md).
$python scripts/benchmark.py --shape 7b --batch 16 --seq 512 --offload \
  --methods forward,qst:adapter,qlora --out "$out/benchmark_offload.jsonl" | tee "$out/benchmark_offload.txt"
$python scripts/benchmark.py --shape 7b --batch 16 --seq 512 --offload weights+states \
  --methods qst:adapter --out "$out/benchmark_offload.jsonl" | tee -a "$out/benchmark_offload.txt"
JAX_ENABLE_PGLE=true JAX_PGLE_PROFILING_RUNS=2 $python scripts/benchmark.py --shape 7b --batch 16 --seq 512 \
  --offload --methods qst:adapter --out "$out/benchmark_offload_pgle.jsonl" | tee "$out/benchmark_offload_pgle.txt"
$python - <<'EOF' 2>&1 | tee "$out/mesh.txt"
# The sharded step on a (1, 1, 1) mesh equals the unsharded step (issue 7's GPU check).
import jax, jax.numpy as jnp, numpy as np, optax
from qst_jax.models.random_init import llama2_config, random_params
from qst_jax.parallel import backbone_shardings, batch_sharding, make_mesh, replicated
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods import QSTModel
from qst_jax.train.step import init_train_state, make_train_step

cfg = llama2_config("tiny")
params = random_params(cfg, jax.random.PRNGKey(0))
model = QSTModel(cfg, SideConfig(reduction_factor=8))
tx = optax.adamw(1e-3)
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 4, 64)).astype(np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
plain = make_train_step(model, tx)(init_train_state(model, tx, jax.random.PRNGKey(0)), params, batch)
mesh = make_mesh()
sh = backbone_shardings(params, mesh)
state = init_train_state(model, tx, jax.random.PRNGKey(0))
state_sh = replicated(state, mesh)
step = make_train_step(model, tx, shardings=(state_sh, sh, batch_sharding(mesh)))
sharded = step(jax.device_put(state, state_sh), jax.device_put(params, sh), batch)
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree_util.tree_leaves(plain[0].params), jax.tree_util.tree_leaves(sharded[0].params)))
print(f"one-device mesh vs unsharded: loss {float(plain[1]['loss']):.6f} vs {float(sharded[1]['loss']):.6f}, "
      f"max param diff {diff:.3g}")
EOF
echo "results in $out"
