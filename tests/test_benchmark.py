"""scripts/benchmark.py runs at the tiny shape (the GPU figures come from the same script)."""

from __future__ import annotations

import json

import jax
import numpy as np

from qst_jax.models.random_init import llama2_config, random_nf4, random_params
from qst_jax.quant import NF4Weight
from tests.helpers import script


def test_random_nf4_is_valid():
    w = random_nf4(jax.random.PRNGKey(0), (2,), (64, 128))
    assert isinstance(w, NF4Weight) and w.packed.shape == (2, 64, 64) and w.absmax.shape == (2, 64, 2)
    deq = np.asarray(w.dequantize(np.float32))
    assert np.isfinite(deq).all() and 0.005 < np.abs(deq).max() < 0.2


def test_benchmark_tiny(tmp_path, capsys):
    module = script("benchmark")
    out = tmp_path / "bench.jsonl"
    records = module.main(["--shape", "tiny", "--batch", "2", "--seq", "32", "--steps", "2",
                           "--methods", "forward,qst:adapter,qst:maxpool", "--out", str(out)])
    assert [r["method"] for r in records] == ["forward", "qst:adapter", "qst:maxpool"]
    for r in records:
        assert "error" not in r, r
        assert r["loss_finite"] and r["grad_norm_nonzero"] and r["step_s"] > 0 and r["compile_s"] > 0
    assert records[1]["trainable_params"] > records[2]["trainable_params"] > 0  # pooling has no downsampler params
    assert len(out.read_text().splitlines()) == 3 and json.loads(out.read_text().splitlines()[0])["shape"] == "tiny"
    assert "tok/s" in capsys.readouterr().out


def test_benchmark_nnx_loops(capsys):
    """The README's two NNX loops run in the benchmark beside make_train_step, on the same first loss."""
    module = script("benchmark")
    records = module.main(["--shape", "tiny", "--batch", "2", "--seq", "32", "--steps", "1", "--methods",
                           "qst:adapter,forward", "--loops", "functional,nnx.jit,nnx.split"])
    good = [r for r in records if "error" not in r]
    assert [(r["method"], r["loop"]) for r in good] == [("qst:adapter", "functional"), ("qst:adapter", "nnx.jit"),
                                                        ("qst:adapter", "nnx.split"), ("forward", "functional")]
    assert len({r["trainable_params"] for r in good[:3]}) == 1
    assert all(r["loss_finite"] and r["grad_norm_nonzero"] for r in good)
    refused = [r["error"] for r in records if "error" in r]
    assert refused == ["ValueError: --loops nnx.jit runs single qst/qlora steps, not 'forward' with K=0",
                       "ValueError: --loops nnx.split runs single qst/qlora steps, not 'forward' with K=0"]
    assert "vs fn" in capsys.readouterr().out


def test_random_backbone_layout_matches_loader():
    params = random_params(llama2_config("tiny"), jax.random.PRNGKey(0))
    assert params["layers"]["attn"]["q"]["w"].lead_shape == (4,)
    assert params["embed"].shape == (1024, 256) and params["lm_head"]["w"].shape == (1024, 256)


def test_kernel_benchmark_tiny_interpret(capsys):
    """The fused-kernel benchmark runs (interpret mode on CPU) and its two paths agree."""
    module = script("kernel_benchmark")
    records = module.main(["--shape", "tiny", "--interpret", "--tokens", "4", "--steps", "1", "--skip-forward"])
    assert [(r["layer"], r["path"]) for r in records] == [
        (layer, path) for layer in ("q", "gate", "down") for path in ("reference", "fused")
    ]
    assert all(r["step_s"] > 0 for r in records)
    assert all(r["rel_diff_vs_reference"] < 2e-2 for r in records if "rel_diff_vs_reference" in r)
    assert "speedup" in capsys.readouterr().out
