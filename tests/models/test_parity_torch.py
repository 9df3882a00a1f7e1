"""Parity with transformers' PyTorch models in float32 (needs torch; else skipped)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from qst_jax.models import load_backbone  # noqa: E402
from qst_jax.models.layers import positions_from_mask  # noqa: E402

pytestmark = pytest.mark.parity

LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

CASES = {
    "llama-gqa-default": ("LlamaConfig", dict(LLAMA)),
    "llama-linear": ("LlamaConfig", dict(LLAMA, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    # max_position_embeddings 16 < 24 tokens: dynamic NTK scaling is active.
    "llama-dynamic": (
        "LlamaConfig",
        dict(LLAMA, max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    ),
    "llama3": (
        "LlamaConfig",
        dict(
            LLAMA,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
                "rope_theta": 500000.0,
            },
        ),
    ),
    "mistral-window": ("MistralConfig", dict(LLAMA, sliding_window=8, head_dim=16)),
    "qwen2-bias": ("Qwen2Config", dict(LLAMA, use_sliding_window=False)),
    "opt-proj": (
        "OPTConfig",
        dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1),
    ),
    "opt-post-ln": (
        "OPTConfig",
        dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, do_layer_norm_before=False, pad_token_id=1),
    ),
}


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, size=(3, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, 17:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    config_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # make norms and biases non-trivial so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)

    ids, mask = _batch()
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        extra = {} if config_cls == "OPTConfig" else {"position_ids": torch.tensor(positions)}
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **extra).logits.numpy()

    backbone = load_backbone(tmp_path, quantize=False, dtype=jnp.float32)
    ours = np.asarray(backbone.logits(ids, mask))
    real = mask.astype(bool)
    rel = np.linalg.norm(ours[real] - ref[real]) / np.linalg.norm(ref[real])
    assert rel <= 1e-4, f"{case}: relative error {rel:.2e}"
