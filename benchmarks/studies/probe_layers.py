"""Linear probes of every backbone layer on SST-2: how much sentiment each frozen state holds.

    python benchmarks/studies/probe_layers.py [--train-rows 4000] [--every 3]
    python benchmarks/studies/probe_layers.py --seq-len 96 --template $'Review: {sentence}\nIs the sentiment of this review positive or negative? Answer:'

Runs the packaged SmolLM2-135M-Instruct (NF4) once over a fixed slice of the
SST-2 train split (the slice `benchmarks/studies/quality.py` trains on, seed 0) and the
whole dev split, keeps each layer's state through the norm the backbone
applies next (the last token's and the mean over real tokens), and fits an
L2-regularised logistic regression (L-BFGS, standardised features) per layer.
Prints dev accuracy per layer and pooling: the ceiling of a linear read-out
of one frozen state, for comparison with QST and QLoRA (docs/quality.md);
then one probe of every layer's states side by side (2 x L x d features):
what a linear read-out of all the frozen states reaches.
`--template` writes each row into a prompt first; each row keeps its first
`--seq-len` tokens, so a prompt that ends the row must fit inside them.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "studies"))


def _rows(path: str) -> tuple[list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows])


def layer_features(backbone, token_ids: list[list[int]], seq_len: int = 64, batch: int = 32):
    """Per layer, the last real token's and the mean normed state: two float32 arrays `[L, N, d]`.

    Each layer's output goes through the norm the backbone applies to it
    next (the last layer's: the final norm), as the side network's
    `input_norm="backbone"` reads it. Rows are cut to `seq_len` tokens.
    """
    from qst_jax.methods.side_network import reader_norms
    from qst_jax.models.decoder import embed, make_context, scan_layers
    from qst_jax.models.layers import norm, positions_from_mask

    cfg, params = backbone.cfg, backbone.params

    @jax.jit
    def run(ids, mask):
        pos = positions_from_mask(mask)
        ctx = make_context(cfg, mask, pos, backbone.dtype)
        _, nxt = reader_norms(params, cfg)
        last = jnp.sum(mask, 1) - 1
        weights = mask.astype(jnp.float32)[..., None]

        def pooled(i, h):
            normed = norm(jax.tree.map(lambda a: a[i], nxt), h, cfg.norm_eps).astype(jnp.float32)
            at_last = jnp.take_along_axis(normed, last[:, None, None], 1)[:, 0]
            return at_last, jnp.sum(normed * weights, 1) / jnp.sum(weights, 1)

        h0 = embed(params, cfg, ids, pos, mask, backbone.dtype)
        return scan_layers(params["layers"], h0, cfg, ctx, collect=pooled)[2]

    lasts, means = [], []
    for start in range(0, len(token_ids), batch):
        chunk = [list(ids)[:seq_len] for ids in token_ids[start:start + batch]]
        ids = np.zeros((batch, seq_len), np.int32)
        mask = np.zeros((batch, seq_len), np.int32)
        mask[:, 0] = 1
        for j, e in enumerate(chunk):
            ids[j, :len(e)], mask[j, :len(e)] = e, 1
        at_last, mean = run(jnp.asarray(ids), jnp.asarray(mask))
        lasts.append(np.asarray(at_last)[:, :len(chunk)])
        means.append(np.asarray(mean)[:, :len(chunk)])
    return np.concatenate(lasts, 1), np.concatenate(means, 1)


def every_layer(last: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """`[N, 2 * L * d]`: each row's last-token and mean states of every layer (`[L, N, d]` each), side by side."""
    return np.concatenate([np.moveaxis(x, 0, 1).reshape(x.shape[1], -1) for x in (last, mean)], axis=1)


def probe_accuracy(x: np.ndarray, y: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray, l2: float = 1e-1,
                   iterations: int = 300) -> float:
    """Dev accuracy of an L2-regularised logistic regression on standardised features (L-BFGS)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_dev = jnp.asarray((x - mu) / sd), jnp.asarray((x_dev - mu) / sd)
    y = jnp.asarray(y, jnp.float32)

    def loss(wb):
        z = x @ wb[0] + wb[1]
        return jnp.mean(jax.nn.softplus(z) - y * z) + l2 * jnp.sum(wb[0] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def step(wb, state):
        value, grad = value_and_grad(wb, state=state)
        updates, state = opt.update(grad, state, wb, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(wb, updates), state

    wb = (jnp.zeros(x.shape[1]), jnp.zeros((), jnp.float32))
    state = opt.init(wb)
    for _ in range(iterations):
        wb, state = step(wb, state)
    return float(jnp.mean(((x_dev @ wb[0] + wb[1]) > 0) == jnp.asarray(y_dev)))


def main() -> None:
    from qst_jax.data.specs import resolve_model_path
    from qst_jax.models.loader import load_backbone, load_tokenizer
    from quality import sst2_slice

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=4000, help="train rows probed (the slice's first)")
    parser.add_argument("--every", type=int, default=3, help="probe every n-th layer (and the last)")
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--template", default="{sentence}",
                        help="how each row is written, {sentence} its text (e.g. a task prompt)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens kept per row (its first)")
    parser.add_argument("--output", default="runs/probe")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    texts, labels = _rows(sst2_slice(8000, os.path.join(args.output, "sst2_train_slice.tsv")))
    texts, labels = texts[:args.train_rows], labels[:args.train_rows]
    dev_texts, dev_labels = _rows(str(REPO / "data" / "glue" / "sst2" / "dev.tsv"))
    path = resolve_model_path("smollm2")
    backbone, tokenizer = load_backbone(path), load_tokenizer(path)
    encode = lambda t: tokenizer.encode(args.template.format(sentence=t))  # noqa: E731
    train_last, train_mean = layer_features(backbone, [encode(t) for t in texts], args.seq_len)
    dev_last, dev_mean = layer_features(backbone, [encode(t) for t in dev_texts], args.seq_len)
    layers = backbone.cfg.num_layers
    print(f"{'layer':>5} {'last token':>10} {'mean':>6}   (SST-2 dev accuracy, {len(texts)} train rows, l2 {args.l2})")
    for i in range(layers):
        if (i + 1) % args.every == 0 or i == layers - 1:
            acc_last = probe_accuracy(train_last[i], labels, dev_last[i], dev_labels, args.l2)
            acc_mean = probe_accuracy(train_mean[i], labels, dev_mean[i], dev_labels, args.l2)
            print(f"{i + 1:>5} {100 * acc_last:>10.1f} {100 * acc_mean:>6.1f}", flush=True)
    both = probe_accuracy(every_layer(train_last, train_mean), labels, every_layer(dev_last, dev_mean), dev_labels,
                          args.l2)
    print(f"every layer's last-token and mean states in one probe: {100 * both:.1f}")


if __name__ == "__main__":
    main()
