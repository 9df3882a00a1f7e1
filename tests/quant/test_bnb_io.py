"""bitsandbytes serialization: round trips, the tiny-llama-nf4 fixture, bad input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qst_jax.quant import NF4Weight, QuantizationError, load_safetensors, quantize, read_nf4, save_safetensors
from qst_jax.quant.bnb_io import SafetensorsView, quantized_prefixes, to_bnb_tensors

PREFIX = "model.layers.0.mlp.up_proj"


def _random_weight(shape=(48, 192), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_through_safetensors(tmp_path, double_quant):
    w = _random_weight()
    q = quantize(w, double_quant=double_quant)
    bias = np.arange(48, dtype=np.float32)
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {f"{PREFIX}.weight": q, f"{PREFIX}.bias": bias})

    # Read the raw keys back with safetensors alone.
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        packed = f.get_tensor(f"{PREFIX}.weight")
        state = json.loads(f.get_tensor(f"{PREFIX}.weight.quant_state.bitsandbytes__nf4").tobytes())
        absmax = f.get_tensor(f"{PREFIX}.weight.absmax")
    assert packed.dtype == np.uint8 and packed.shape == (48 * 192 // 2, 1)
    assert state["quant_type"] == "nf4" and state["blocksize"] == 64 and state["shape"] == [48, 192]
    assert state["dtype"] == "bfloat16"
    if double_quant:
        assert {f"{PREFIX}.weight.nested_absmax", f"{PREFIX}.weight.nested_quant_map"} <= keys
        assert absmax.dtype == np.uint8
        assert np.float32(state["nested_offset"]) == np.asarray(q.offset)
    else:
        assert not any("nested" in k for k in keys)
        assert absmax.dtype == np.float32

    loaded = load_safetensors(path)
    assert set(loaded) == {f"{PREFIX}.weight", f"{PREFIX}.bias"}
    np.testing.assert_array_equal(loaded[f"{PREFIX}.bias"], bias)
    back = loaded[f"{PREFIX}.weight"]
    assert isinstance(back, NF4Weight) and back.double_quant == double_quant
    np.testing.assert_array_equal(
        np.asarray(back.dequantize(jnp.bfloat16)).view(np.uint16),
        np.asarray(q.dequantize(jnp.bfloat16)).view(np.uint16),
    )


def test_reads_bnb_fixture_and_matches_our_quantizer(testdata):
    """Every layer of the bnb-written checkpoint reads, and quantizing the bf16
    original ourselves reproduces its bytes."""
    nf4 = testdata / "tiny-llama-nf4" / "model.safetensors"
    bf16 = testdata / "tiny-llama-bf16" / "model.safetensors"
    with safe_open(str(nf4), framework="numpy") as f, safe_open(str(bf16), framework="numpy") as g:
        view = SafetensorsView(f)
        prefixes = quantized_prefixes(view)
        assert len(prefixes) == 4 * 7 and set(prefixes.values()) == {"nf4"}
        for prefix in prefixes:
            theirs = read_nf4(prefix, view)
            original = g.get_tensor(f"{prefix}.weight")
            assert theirs.shape == original.shape and theirs.double_quant
            ours = quantize(original)
            np.testing.assert_array_equal(np.asarray(ours.packed), np.asarray(theirs.packed))
            np.testing.assert_array_equal(np.asarray(ours.absmax), np.asarray(theirs.absmax))
            deq = np.asarray(theirs.dequantize(jnp.float32))
            ref = original.astype(np.float32)
            assert np.linalg.norm(deq - ref) / np.linalg.norm(ref) < 0.12


def test_non_uint8_quant_storage_is_reinterpreted():
    q = quantize(_random_weight())
    tensors = to_bnb_tensors(PREFIX, q)
    # bnb_4bit_quant_storage=bfloat16: the same bytes viewed as bf16.
    tensors[f"{PREFIX}.weight"] = tensors[f"{PREFIX}.weight"].reshape(-1).view(ml_dtypes.bfloat16).reshape(-1, 1)
    back = read_nf4(PREFIX, tensors)
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(q.packed))


def test_fp4_is_rejected_with_a_clear_error():
    tensors = to_bnb_tensors(PREFIX, quantize(_random_weight(), double_quant=False))
    state = tensors.pop(f"{PREFIX}.weight.quant_state.bitsandbytes__nf4")
    fp4_state = json.loads(state.tobytes())
    fp4_state["quant_type"] = "fp4"
    tensors[f"{PREFIX}.weight.quant_state.bitsandbytes__fp4"] = np.frombuffer(json.dumps(fp4_state).encode(), np.uint8)
    with pytest.raises(QuantizationError, match=r"up_proj.*bitsandbytes__fp4.*'fp4' is not supported"):
        read_nf4(PREFIX, tensors, source="m.safetensors: ")


def test_corrupt_quant_state_names_the_tensor():
    tensors = to_bnb_tensors(PREFIX, quantize(_random_weight()))
    tensors[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b'{"quant_type": "nf4", bro', np.uint8)
    with pytest.raises(QuantizationError, match=r"m\.safetensors: model\.layers\.0\.mlp\.up_proj.*not valid UTF-8 JSON"):
        read_nf4(PREFIX, tensors, source="m.safetensors: ")


def test_missing_and_inconsistent_tensors():
    good = to_bnb_tensors(PREFIX, quantize(_random_weight()))
    missing = dict(good)
    del missing[f"{PREFIX}.weight.nested_absmax"]
    with pytest.raises(QuantizationError, match=r"up_proj\.weight\.nested_absmax: tensor missing"):
        read_nf4(PREFIX, missing)
    short = dict(good)
    short[f"{PREFIX}.weight"] = good[f"{PREFIX}.weight"][:-2]
    with pytest.raises(QuantizationError, match=r"up_proj\.weight: .*packed bytes, expected"):
        read_nf4(PREFIX, short)
    with pytest.raises(QuantizationError, match="quant_state.*missing"):
        read_nf4("model.nothing", good)


def test_checkpoint_with_nf4_and_fp4_file(tmp_path):
    tensors = to_bnb_tensors(PREFIX, quantize(_random_weight()))
    state = json.loads(tensors[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"].tobytes())
    state["quant_type"] = "fp4"
    tensors[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(QuantizationError, match="x.safetensors.*'fp4' is not supported"):
        load_safetensors(tmp_path / "x.safetensors")
