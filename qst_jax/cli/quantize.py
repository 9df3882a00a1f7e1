"""`qst-quantize`: quantize a safetensors file to NF4 and report the cost.

    qst-quantize model.safetensors [--out model-nf4.safetensors]
    qst-quantize --random 4096x4096

For every 2-D floating-point tensor whose input dimension is a multiple of the
blocksize it prints the bits per parameter (all scales included) and the error
of the dequantized weight; with `--out` it writes the quantized tensors in
bitsandbytes' layout (other tensors copied as they are). Tensors are processed
one at a time, so memory stays near one tensor's float32 copy.
"""

from __future__ import annotations

import argparse
import os
import sys

import ml_dtypes  # noqa: F401
import numpy as np

from qst_jax.quant import bits_per_parameter, save_safetensors
from qst_jax.quant.nf4 import QuantizationError, check_finite, quantize_jit



def _error_stats(w: np.ndarray, q) -> tuple[float, float]:
    ref = w.astype(np.float32)
    deq = np.asarray(q.dequantize(np.float32))
    rel = float(np.linalg.norm(deq - ref) / max(np.linalg.norm(ref), 1e-30))
    return rel, float(np.abs(deq - ref).max())


def _tensors(args: argparse.Namespace):
    if args.random:
        rng = np.random.default_rng(0)
        yield "random.weight", (rng.standard_normal(args.random_shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        return
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(args.path):
        raise SystemExit(f"qst-quantize: {args.path}: no such file")
    try:
        with safe_open(args.path, framework="numpy") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as err:  # truncated, or not a safetensors file at all
        raise QuantizationError(f"{args.path}: cannot read as safetensors ({str(err).splitlines()[0]}); "
                                "give a .safetensors weights file") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qst-quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a .safetensors file")
    parser.add_argument("--random", metavar="OUTxIN", help="quantize a random N(0, 0.02) weight instead")
    parser.add_argument("--out", help="write the NF4 checkpoint here")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true", help="keep float32 block scales")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.path and not args.random:
        parser.error("give a .safetensors path or --random OUTxIN")
    if args.blocksize < 1 or args.blocksize & (args.blocksize - 1):
        parser.error(f"--blocksize {args.blocksize}: a positive power of two (bitsandbytes uses 64)")
    if args.random:
        try:
            out_dim, in_dim = (int(s) for s in args.random.lower().split("x"))
        except ValueError:
            parser.error(f"--random {args.random}: give OUTxIN, two positive integers such as 4096x4096")
        if out_dim < 1 or in_dim < 1:
            parser.error(f"--random {args.random}: both dimensions must be positive")
        args.random_shape = (out_dim, in_dim)
    if args.path and os.path.isdir(args.path):
        parser.error(f"{args.path}: is a folder; give its .safetensors weights file")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out):
            parser.error(f"--out {args.out}: is a folder; name the .safetensors file to write")
        if not os.path.isdir(folder):
            parser.error(f"--out {args.out}: the folder {folder} does not exist")
        if args.path and os.path.exists(args.out) and os.path.samefile(args.path, args.out):
            parser.error(f"--out {args.out}: is the input file; write the NF4 checkpoint to another file")

    try:
        return _run(args)
    except QuantizationError as err:
        print(f"qst-quantize: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    rows, out_tensors = [], {}
    total_bits = total_params = 0.0
    for key, w in _tensors(args):
        is_float = np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16
        eligible = is_float and w.ndim == 2 and w.shape[1] % args.blocksize == 0
        if not eligible:
            out_tensors[key] = w
            continue
        check_finite(w, key)
        q = quantize_jit(w, blocksize=args.blocksize, double_quant=not args.no_double_quant)
        bpp = bits_per_parameter(q)
        rel, max_abs = _error_stats(w, q)
        rows.append((key, f"{w.shape[0]}x{w.shape[1]}", bpp, rel, max_abs))
        total_bits += bpp * w.size
        total_params += w.size
        out_tensors[key] = q
    if not rows:
        print("no 2-D float tensor with a whole number of blocks per row: nothing quantized")
        return 1
    width = max(len(r[0]) for r in rows)
    print(f"{'tensor':<{width}}  {'shape':>12}  {'bits/param':>10}  {'rel L2 err':>10}  {'max |err|':>10}")
    for key, shape, bpp, rel, max_abs in rows:
        print(f"{key:<{width}}  {shape:>12}  {bpp:>10.4f}  {rel:>10.4f}  {max_abs:>10.3g}")
    print(f"total: {int(total_params)} parameters quantized, {total_bits / total_params:.4f} bits/param")
    if args.out:
        save_safetensors(args.out, out_tensors)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
