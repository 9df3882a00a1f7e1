"""What the command-line tools share: loading a backbone with an optional tuned model, or several."""

from __future__ import annotations

import os
from typing import Any


def add_model_args(parser: Any, offload: bool = False) -> None:
    """--model, --revision, --side, --no-quantize, --dtype; with `offload`, --offload (forward-only passes)."""
    parser.add_argument("--model", required=True,
                        help="HF dir, bnb NF4 dir, .gguf file, 'smollm2', or a Hub repo org/name (org/name:file.gguf)")
    parser.add_argument("--revision", default=None, help="the Hub repo's branch, tag or commit (default: main)")
    parser.add_argument("--side", action="append", default=[],
                        help="a qst-train output dir (side.safetensors + qst_config.json); repeat it for several "
                             "QST side networks run from one backbone pass")
    parser.add_argument("--no-quantize", action="store_true", help="keep the backbone dense instead of NF4")
    parser.add_argument("--dtype", default="bfloat16")
    add_compile_cache_arg(parser)
    if offload:
        parser.add_argument("--offload", default="none", choices=["none", "weights"],
                            help="weights: keep the frozen layers in pinned host memory and stream them to the device "
                                 "one layer ahead (a backbone larger than the device)")


def add_compile_cache_arg(parser: Any) -> None:
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile every program anew (default: reuse compiled programs from JAX's persistent "
                             "cache in $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/qst_jax/xla)")


def use_compile_cache(enabled: bool) -> str | None:
    """Turns JAX's persistent compilation cache on for this command's process (a restart then loads, not compiles).

    The directory is `$JAX_COMPILATION_CACHE_DIR` when set, else
    `$XDG_CACHE_HOME/qst_jax/xla` (`~/.cache/qst_jax/xla`). Only the
    command-line tools call it: importing qst_jax changes nothing.

    Returns:
      the cache directory, or None when `enabled` is False (caching off).
    """
    import jax

    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_home, "qst_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def side_names(sides: list[str]) -> list[str]:
    """The name of each `--side`: the folder's name, or the path as given where two folders share a name."""
    bases = [os.path.basename(os.path.normpath(s)) for s in sides]
    return [b if bases.count(b) == 1 else s for b, s in zip(bases, sides)]


def load_model(args: Any):
    """(backbone, tokenizer, model, params, info): the frozen backbone's method and {} without --side.

    With several `--side`, `model` is their `SideSet` (QST only, one
    backbone pass for all), `params` its stacked params and `info` the
    exports' records by name (`side_names`).
    """
    import jax.numpy as jnp

    from qst_jax.data.specs import resolve_model_path
    from qst_jax.methods import FrozenModel, load_tuned
    from qst_jax.methods.side_set import SideSet
    from qst_jax.models import load_backbone, load_tokenizer
    from qst_jax.models.hub import resolve_model

    path = resolve_model(resolve_model_path(args.model), args.revision)
    backbone = load_backbone(path, quantize=not args.no_quantize, dtype=jnp.dtype(args.dtype),
                             offload=getattr(args, "offload", "none"))
    tokenizer = load_tokenizer(path)
    if len(args.side) > 1:
        loaded = [load_tuned(side, backbone) for side in args.side]
        sides = SideSet.of([m for m, _, _ in loaded], names=[f"--side {side}" for side in args.side])
        infos = dict(zip(side_names(args.side), (info for _, _, info in loaded)))
        return backbone, tokenizer, sides, sides.stack([p for _, p, _ in loaded]), infos
    if args.side:
        model, params, info = load_tuned(args.side[0], backbone)
    else:
        model, params, info = FrozenModel(backbone.cfg, backbone.dtype), {}, {}
    return backbone, tokenizer, model, params, info
