"""Perplexity of the packaged SmolLM2-135M-Instruct on a held-out Shakespeare play.

    python benchmarks/studies/smollm2_perplexity.py [--play hamlet] [--windows 8] [--seq-len 512]

Loads the GGUF twice (dense bf16 and NF4), prints both perplexities, their
ratio, and the greedy continuation of "The capital of France is".
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qst_jax.data.examples import Examples
from qst_jax.data.offline import shakespeare_plays, smollm2_gguf
from qst_jax.eval.tasks import perplexity
from qst_jax.models import load_backbone, load_tokenizer
from qst_jax.methods import FrozenModel
from qst_jax.eval.tasks import make_eval_step


def greedy(backbone, tokenizer, prompt: str, steps: int = 8) -> str:
    """Greedy continuation by full forwards (the cached decoder lives in generate/)."""
    ids = list(tokenizer(prompt).input_ids)
    for _ in range(steps):
        logits = backbone.logits(np.asarray([ids]))
        ids.append(int(np.argmax(logits[0, -1])))
    return tokenizer.decode(ids)


def evaluate(play: str = "hamlet", windows: int = 8, seq_len: int = 512) -> dict[str, float | str]:
    path = smollm2_gguf()
    tokenizer = load_tokenizer(path)
    with open(shakespeare_plays()[play], encoding="utf-8") as f:
        ids = tokenizer(f.read()).input_ids
    count = min(len(ids) // seq_len, windows)
    tokens = [np.asarray(ids[i * seq_len : (i + 1) * seq_len], np.int32) for i in range(count)]
    chunks = Examples(tokens=tokens, loss_masks=[np.ones_like(t) for t in tokens])  # score every next token
    result: dict[str, float | str] = {}
    for name, quantize in (("bf16", False), ("nf4", True)):
        start = time.perf_counter()
        backbone = load_backbone(path, quantize=quantize)
        eval_step = make_eval_step(FrozenModel(backbone.cfg, backbone.dtype))  # qst-train's held-out scoring
        result[f"ppl_{name}"] = perplexity(eval_step, {}, backbone.params, chunks, batch_size=4)["perplexity"]
        result[f"seconds_{name}"] = time.perf_counter() - start
        if quantize:
            result["greedy_nf4"] = greedy(backbone, tokenizer, "The capital of France is")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    r = evaluate(args.play, args.windows, args.seq_len)
    print(f"SmolLM2-135M-Instruct on {args.play} ({args.windows} x {args.seq_len} tokens)")
    print(f"  perplexity bf16: {r['ppl_bf16']:.2f}   ({r['seconds_bf16']:.1f} s)")
    print(f"  perplexity NF4:  {r['ppl_nf4']:.2f}   ({r['seconds_nf4']:.1f} s)")
    print(f"  NF4 / bf16:      {r['ppl_nf4'] / r['ppl_bf16']:.3f}")
    print(f"  greedy (NF4):    {r['greedy_nf4']!r}")


if __name__ == "__main__":
    main()
