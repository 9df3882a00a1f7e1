"""`qst-export`: a trained run's export pushed to the Hugging Face Hub, with a model card.

    qst-export runs/default --push-to-hub my-org/smollm2-qst-shakespeare [--private]

RUN_DIR is a run directory (or a sweep's `members/<name>/`) holding
`side.safetensors` and `qst_config.json`; its `summary.json`, when there,
gives the card's held-out figures. The repo then loads anywhere qst_jax
takes a side network: `qst-generate --model BASE --side my-org/...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qst_jax.errors import QSTError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qst-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a qst-train output directory (side.safetensors + qst_config.json)")
    parser.add_argument("--push-to-hub", required=True, metavar="ORG/NAME", help="the model repo to push to")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--message", default="Upload a qst_jax side network", help="the commit message")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qst_jax.hub import is_repo_id, push
    from qst_jax.methods.export import CONFIG_FILE, WEIGHTS_FILE, load_side
    from qst_jax.methods.hub_card import model_card

    try:
        if not is_repo_id(args.push_to_hub):
            raise QSTError(f"--push-to-hub {args.push_to_hub!r}: a Hub repo is written org/name",
                           field="--push-to-hub")
        _, info = load_side(args.run_dir)  # a missing, unreadable or non-finite export is refused here
        summary_path = os.path.join(args.run_dir, "summary.json")
        summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else None
        files = {name: open(os.path.join(args.run_dir, name), "rb").read() for name in (WEIGHTS_FILE, CONFIG_FILE)}
        files["README.md"] = model_card(args.push_to_hub, info, summary).encode()
        url = push(args.push_to_hub, files, message=args.message, private=args.private)
    except (QSTError, OSError, ValueError) as err:
        print(f"qst-export: error: {err}", file=sys.stderr)
        return 1
    print(f"pushed {', '.join(files)} to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
