"""PEFT's LoRA layout both ways: a QLoRA export holds a PEFT adapter that `peft.PeftModel` loads (logits equal,
with torch and peft installed), and a PEFT adapter folder loads as a QLoRA model."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.methods import QLoRAModel, export_side, load_tuned
from qst_jax.methods.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftFormatError, from_peft
from qst_jax.models import load_backbone


def _qlora(backbone, rank=4, alpha=8.0, seed=0):
    """A QLoRA model whose B is non-zero (an init's B is zero: no update to test)."""
    model = QLoRAModel(backbone.cfg, rank=rank, alpha=alpha, dtype=jnp.float32)
    params = model.init(jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return model, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-bf16", quantize=False, dtype=jnp.float32)


def test_a_qlora_export_is_a_peft_adapter_and_loads_back(backbone, tmp_path):
    model, params = _qlora(backbone)
    export_side(str(tmp_path / "run"), model, params, backbone.cfg, {"model_path": "org/base"})
    config = json.loads((tmp_path / "run" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 4, 8.0, "org/base")
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft_only = tmp_path / "peft"
    peft_only.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy(tmp_path / "run" / name, peft_only / name)
    loaded, loaded_params, info = load_tuned(str(peft_only), backbone)
    assert (loaded.name, loaded.rank, loaded.alpha, info["model_path"]) == ("qlora", 4, 8.0, "org/base")
    for a, b in zip(jax.tree.leaves(loaded_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_peft_adapter_on_fewer_linears_and_refusals(backbone, tmp_path):
    model, params = _qlora(backbone)
    export_side(str(tmp_path), model, params, backbone.cfg, {})
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    save_file({k: v for k, v in tensors.items() if "q_proj" in k or "v_proj" in k}, tmp_path / ADAPTER_WEIGHTS)
    _, partial = from_peft(str(tmp_path), backbone.cfg)
    np.testing.assert_array_equal(partial["lora"]["attn"]["q"]["b"], np.asarray(params["lora"]["attn"]["q"]["b"]))
    assert not partial["lora"]["mlp"]["up"]["b"].any()  # untargeted: B = 0, no update
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PeftFormatError, match=r"adapter_config.json: use_dora set; qst_jax's LoRA implements none"):
        from_peft(str(tmp_path), backbone.cfg)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file({**tensors, "base_model.model.model.embed_tokens.lora_A.weight": np.zeros((4, 8), np.float32)},
              tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(PeftFormatError, match=r"embed_tokens.lora_A.weight is not a LoRA weight of a linear QLoRA "
                                              r"targets on this llama backbone \(1 such keys\)"):
        from_peft(str(tmp_path), backbone.cfg)


def _dequantized_into(hf, backbone):
    """The HF model's linears replaced by our NF4 backbone's, dequantized (float32): the same weights for both."""
    import torch

    from qst_jax.models.params import layer_specs
    from qst_jax.quant.matmul import materialize

    state = hf.state_dict()
    for path, hf_name, _, is_linear in layer_specs(backbone.cfg):
        if not is_linear:
            continue
        stacked = backbone.params["layers"][path[0]][path[1]][path[2]]
        for i in range(backbone.cfg.num_layers):
            dense = materialize(jax.tree.map(lambda x, i=i: x[i], stacked), jnp.float32)
            state[f"model.layers.{i}.{hf_name}"] = torch.from_numpy(np.array(dense))
    hf.load_state_dict(state)
    return hf


@pytest.mark.parity
@pytest.mark.parametrize("weights", ["dense", "nf4"])
def test_peft_model_gives_our_logits(backbone, testdata, tmp_path, weights):
    """PeftModel over the same weights (float32, or our NF4 ones dequantized into the HF model) gives our logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    if weights == "nf4":
        backbone = load_backbone(testdata / "tiny-llama-bf16", quantize=True, dtype=jnp.float32)
    model, params = _qlora(backbone)
    export_side(str(tmp_path / "run"), model, params, backbone.cfg, {"model_path": str(testdata / "tiny-llama-bf16")})
    hf = transformers.AutoModelForCausalLM.from_pretrained(testdata / "tiny-llama-bf16", torch_dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    if weights == "nf4":
        hf = _dequantized_into(hf, backbone)
    tuned = peft.PeftModel.from_pretrained(hf, str(tmp_path / "run")).eval()
    ids = np.random.default_rng(0).integers(3, backbone.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ref = tuned(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.logits(params, backbone.params, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32)))
    base = np.asarray(backbone.logits(ids))
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel <= 1e-3, f"relative difference {rel:.2e}"
    assert np.linalg.norm(ours - base) / np.linalg.norm(base) > 10 * rel  # the adapter changes the logits
