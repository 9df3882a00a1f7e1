"""Peak host memory while loading (and quantizing) a ~1B-parameter checkpoint.

    python benchmarks/studies/load_memory.py [--dir /tmp/qst-1b] [--keep]

Writes a random LLaMA-shaped bf16 checkpoint (hidden 2048, MLP 5632, 22
layers, vocab 32000: 1.1B parameters, 2.2 GB, two safetensors shards), then
loads it with `load_backbone(..., quantize=True)` in a fresh process and
prints the peak growth of allocated (anonymous) resident memory next to the
budget: two float32 copies of the largest decoder layer plus the 4-bit result.
File-backed pages of the memory-mapped checkpoint are printed separately: they
are page cache, which the kernel reclaims under pressure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}


def write_checkpoint(directory: str) -> None:
    import ml_dtypes
    from safetensors.numpy import save_file

    from qst_jax.models.config import from_hf_config
    from qst_jax.models.params import global_specs, layer_specs

    cfg = from_hf_config(CONFIG)
    rng = np.random.default_rng(0)
    names = [("model." + name, shape) for _, name, shape, _ in global_specs(cfg)]
    names.append(("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)))
    for i in range(cfg.num_layers):
        names += [(f"model.layers.{i}.{name}", shape) for _, name, shape, _ in layer_specs(cfg)]
    shards: list[dict[str, np.ndarray]] = [{}, {}]
    weight_map = {}
    for index, (name, shape) in enumerate(names):
        shard = 0 if index < len(names) // 2 else 1
        array = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        shards[shard][name] = array
        weight_map[name] = f"model-{shard + 1:05d}-of-00002.safetensors"
        if shard == 0 and index + 1 == len(names) // 2 or index + 1 == len(names):
            file = f"model-{shard + 1:05d}-of-00002.safetensors"
            save_file(shards[shard], os.path.join(directory, file), metadata={"format": "pt"})
            shards[shard] = {}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(CONFIG, f)


MEASURE = r"""
import json, sys, threading, time
import jax, numpy as np
from qst_jax.models import load_backbone
from qst_jax.models.config import from_hf_config
from qst_jax.models.params import layer_specs

def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out

peak = {"RssAnon": 0, "RssFile": 0}
running = True

def sample():
    while running:
        for k, v in rss().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.002)

cfg = from_hf_config(CONFIG)
# Warm up: compile the quantizer for every linear shape first (not the loader's cost).
from qst_jax.quant.nf4 import quantize_jit
for _, _, shape, linear in layer_specs(cfg):
    if linear:
        quantize_jit(np.zeros(shape, np.float32)).packed.block_until_ready()
base = rss()
sampler = threading.Thread(target=sample)
sampler.start()
backbone = load_backbone(sys.argv[1])
jax.block_until_ready(backbone.params)
running = False
sampler.join()
leaves = jax.tree_util.tree_leaves(backbone.params)
result_bytes = sum(x.nbytes for x in leaves)
layer_f32 = sum(4 * int(np.prod(shape)) for _, _, shape, _ in layer_specs(cfg))
params = sum(int(np.prod(shape)) for _, _, shape, _ in layer_specs(cfg)) * cfg.num_layers + 2 * cfg.vocab_size * cfg.hidden_size
print(json.dumps(dict(anon=peak["RssAnon"] - base["RssAnon"], file=peak["RssFile"] - base["RssFile"], result_bytes=result_bytes, layer_f32=layer_f32, params=params)))
""".replace("CONFIG", repr(CONFIG))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="qst-1b-")
    os.makedirs(directory, exist_ok=True)
    try:
        if not os.path.exists(os.path.join(directory, "config.json")):
            print(f"writing a random 1.1B-parameter bf16 checkpoint to {directory} ...", flush=True)
            write_checkpoint(directory)
        out = subprocess.run([sys.executable, "-c", MEASURE, directory], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    gib = 1024**3
    growth = r["anon"]
    budget = 2 * r["layer_f32"] + r["result_bytes"]
    print(f"parameters:                    {r['params'] / 1e9:.2f} B")
    print(f"bf16 checkpoint on disk:       {2 * r['params'] / gib:.2f} GiB")
    print(f"loaded result (NF4 + bf16):    {r['result_bytes'] / gib:.2f} GiB")
    print(f"largest layer, float32:        {r['layer_f32'] / gib:.2f} GiB")
    print(f"peak allocated (anonymous) RSS growth while loading: {growth / gib:.2f} GiB")
    print(f"peak file-backed RSS growth (the mmapped checkpoint, page cache): {r['file'] / gib:.2f} GiB")
    print(f"budget (2 x layer + result):   {budget / gib:.2f} GiB  -> {'OK' if growth <= budget else 'OVER'}")


if __name__ == "__main__":
    main()
