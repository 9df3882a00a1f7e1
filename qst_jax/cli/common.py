"""What the command-line tools share: loading a backbone with an optional tuned model."""

from __future__ import annotations

from typing import Any


def add_model_args(parser: Any) -> None:
    parser.add_argument("--model", required=True, help="HF dir, bnb NF4 dir, .gguf file, or 'smollm2'")
    parser.add_argument("--side", help="a qst-train output dir (side.safetensors + qst_config.json)")
    parser.add_argument("--no-quantize", action="store_true", help="keep the backbone dense instead of NF4")
    parser.add_argument("--dtype", default="bfloat16")


def load_model(args: Any):
    """(backbone, tokenizer, model, params, info): the frozen backbone's method and {} without --side."""
    import jax.numpy as jnp

    from qst_jax.data.specs import resolve_model_path
    from qst_jax.methods import FrozenModel, load_tuned
    from qst_jax.models import load_backbone, load_tokenizer

    path = resolve_model_path(args.model)
    backbone = load_backbone(path, quantize=not args.no_quantize, dtype=jnp.dtype(args.dtype))
    tokenizer = load_tokenizer(path)
    if args.side:
        model, params, info = load_tuned(args.side, backbone)
    else:
        model, params, info = FrozenModel(backbone.cfg, backbone.dtype), {}, {}
    return backbone, tokenizer, model, params, info
