"""Backbones against bitsandbytes/HF golden logits, loader behaviour, bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from qst_jax.models import (
    CheckpointError,
    ConfigError,
    forward,
    init_caches,
    load_backbone,
    load_config,
)
from qst_jax.quant import NF4Weight, QuantizationError
from qst_jax.quant.bnb_io import SafetensorsView, quantized_prefixes, read_nf4

FAMILIES = ["llama", "opt"]


def _rel_err(ours, ref, mask):
    real = mask.astype(bool)
    return float(np.linalg.norm(ours[real] - ref[real]) / np.linalg.norm(ref[real]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["nf4", "bf16"])
def test_matches_golden_logits(testdata, family, kind):
    io = np.load(testdata / f"tiny-{family}-io.npz")
    # The -bf16 directory is compared dense (logits_bf16); the -nf4 one as stored.
    backbone = load_backbone(testdata / f"tiny-{family}-{kind}", quantize=kind == "nf4")
    assert backbone.quantized == (kind == "nf4")
    logits = np.asarray(backbone.logits(io["input_ids"], io["attention_mask"]))
    assert logits.dtype == np.float32 and logits.shape == (3, 48, 1024)
    assert _rel_err(logits, io[f"logits_{kind}"], io["attention_mask"]) <= 2e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_quantizing_bf16_dir_reproduces_bnb_bytes(testdata, family):
    ours = load_backbone(testdata / f"tiny-{family}-bf16").params["layers"]
    from safetensors import safe_open

    with safe_open(str(testdata / f"tiny-{family}-nf4" / "model.safetensors"), framework="numpy") as f:
        view = SafetensorsView(f)
        prefixes = quantized_prefixes(view)
        name = "self_attn.q_proj" if family == "llama" else "fc1"
        mine = ours["attn"]["q"]["w"] if family == "llama" else ours["mlp"]["fc1"]["w"]
        for layer in range(4):
            prefix = next(p for p in prefixes if p.endswith(f"layers.{layer}.{name}"))
            theirs = read_nf4(prefix, view)
            np.testing.assert_array_equal(np.asarray(mine.packed[layer]), np.asarray(theirs.packed))
            np.testing.assert_array_equal(np.asarray(mine.absmax[layer]), np.asarray(theirs.absmax))


def test_nf4_fixture_loaded_as_is(testdata):
    backbone = load_backbone(testdata / "tiny-llama-nf4")
    q = backbone.params["layers"]["mlp"]["down"]["w"]
    assert isinstance(q, NF4Weight) and q.lead_shape == (4,) and q.shape == (256, 704)
    assert backbone.params["embed"].dtype == jnp.bfloat16
    assert backbone.params["lm_head"]["w"].dtype == jnp.bfloat16


def test_forward_with_caches_equals_the_uncached_pass(testdata):
    """One forward serves training and cached decoding: prefill 5 tokens, then 3 more from the caches."""
    backbone = load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)
    cfg, params = backbone.cfg, backbone.params
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 3, cfg.vocab_size)
    full, no_caches = forward(params, cfg, ids, dtype=jnp.float32)
    assert no_caches is None and full.shape == (2, 8, 256)
    caches = init_caches(cfg, 2, 8, jnp.float32)
    key_mask = jnp.asarray([[1] * 5 + [0] * 3] * 2, jnp.int32)
    first, caches = forward(params, cfg, ids[:, :5], dtype=jnp.float32, key_mask=key_mask, caches=caches,
                            cache_index=jnp.int32(0))
    positions = jnp.broadcast_to(jnp.arange(5, 8), (2, 3))
    rest, caches = forward(params, cfg, ids[:, 5:], dtype=jnp.float32, positions=positions,
                           key_mask=jnp.ones((2, 8), jnp.int32), caches=caches, cache_index=jnp.int32(5))
    assert caches["k"].shape == (4, 2, 8, cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), np.asarray(full), atol=2e-4, rtol=2e-4)


def test_scan_layers_collects_each_layer_output(testdata):
    """`collect` sees layer i's output with its index; the last one is the state the final norm reads."""
    from qst_jax.models.decoder import embed, final_norm, make_context, scan_layers
    from qst_jax.models.layers import positions_from_mask

    backbone = load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)
    cfg, params = backbone.cfg, backbone.params
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 3, cfg.vocab_size)
    mask = jnp.ones(ids.shape, jnp.int32)
    pos = positions_from_mask(mask)
    ctx = make_context(cfg, mask, pos, jnp.float32)
    h0 = embed(params, cfg, ids, pos, mask, jnp.float32)
    plain = scan_layers(params["layers"], h0, cfg, ctx)
    h_last, caches, (index, states) = scan_layers(params["layers"], h0, cfg, ctx, collect=lambda i, h: (i, h))
    assert len(plain) == 2 and caches is None
    assert index.tolist() == list(range(cfg.num_layers)) and states.shape == (cfg.num_layers, 2, 6, cfg.hidden_size)
    np.testing.assert_array_equal(states[-1], h_last)
    np.testing.assert_array_equal(h_last, plain[0])
    full, _ = forward(params, cfg, ids, dtype=jnp.float32)
    np.testing.assert_allclose(final_norm(params, cfg, states[-1]), full, atol=1e-5, rtol=1e-5)


def test_logical_axes_cover_every_weight(testdata):
    backbone = load_backbone(testdata / "tiny-llama-nf4")
    axes = backbone.axes
    assert axes["embed"] == ("vocab", "embed")
    assert axes["layers/attn/q/w"] == ("layers", "heads", "embed")
    assert axes["layers/attn/k/w"] == ("layers", "kv_heads", "embed")
    assert axes["layers/mlp/down/w"] == ("layers", "embed", "mlp")
    assert axes["layers/attn_norm/scale"] == ("layers", "embed")
    assert axes["lm_head/w"] == ("vocab", "embed")
    assert all(name is not None for name in axes["layers/mlp/gate/w"])
    opt = load_backbone(testdata / "tiny-opt-nf4").axes
    assert opt["pos_embed"] == (None, "embed") and opt["layers/mlp/fc1/b"] == ("layers", "mlp")


def test_sharded_index_directory(testdata, tmp_path):
    from safetensors import safe_open

    src = testdata / "tiny-llama-bf16"
    with safe_open(str(src / "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    a = load_backbone(tmp_path)
    b = load_backbone(src)
    ids = np.arange(16).reshape(2, 8)
    np.testing.assert_array_equal(np.asarray(a.logits(ids)), np.asarray(b.logits(ids)))


# ---- bad input -------------------------------------------------------------


def _copy(testdata, tmp_path, name="tiny-llama-bf16"):
    dst = tmp_path / name
    shutil.copytree(testdata / name, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does-not-exist: no such file or directory"):
        load_backbone("/tmp/does-not-exist")


def test_unsupported_model_type(testdata, tmp_path):
    d = _copy(testdata, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gpt_neox' is not supported"):
        load_config(d)


def test_missing_tensor_names_file_and_key(testdata, tmp_path):
    d = _copy(testdata, tmp_path)
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.2.mlp.up_proj.weight"}
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.layers\.2\.mlp\.up_proj\.weight: tensor missing"):
        load_backbone(d)


def test_shape_mismatch_names_key(testdata, tmp_path):
    d = _copy(testdata, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 768
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: shape \(704, 256\) does not match config \(768, 256\)"):
        load_backbone(d)


def test_fp4_checkpoint_rejected(testdata, tmp_path):
    d = _copy(testdata, tmp_path, "tiny-llama-nf4")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_type 'fp4' is not supported"):
        load_backbone(d)


def test_non_finite_weight_names_tensor(testdata, tmp_path):
    d = _copy(testdata, tmp_path)
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    w = tensors["model.layers.1.self_attn.v_proj.weight"].copy()
    w[3, 4] = np.nan
    tensors["model.layers.1.self_attn.v_proj.weight"] = w
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises((CheckpointError, QuantizationError), match=r"layers\.1\.self_attn\.v_proj\.weight: 1 non-finite"):
        load_backbone(d)


def test_single_query_attention_is_dot_product_attention():
    """The decode step's attention on a GPU (models.layers.single_query_attention) equals jax's, GQA and mask."""
    import jax
    import jax.numpy as jnp

    from qst_jax.models.layers import single_query_attention

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(k[0], (3, 1, 8, 16))
    key, value = jax.random.normal(k[1], (3, 10, 2, 16)), jax.random.normal(k[2], (3, 10, 2, 16))
    mask = jnp.ones((3, 1, 1, 10), bool).at[1, :, :, 6:].set(False)
    want = jax.nn.dot_product_attention(q, key, value, mask=mask, scale=0.25)
    assert float(jnp.max(jnp.abs(single_query_attention(q, key, value, mask, 0.25) - want))) < 1e-5
