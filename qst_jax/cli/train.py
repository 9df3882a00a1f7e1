"""`qst-train --config configs/X.py [--config.train.lr=...] [--resume | --overwrite | --plan h100]`.

Trains a QST side network (or the QLoRA baseline) as the config says; see
README for the configs, data formats and the outputs of a run.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qst_jax.errors import QSTError

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
_RESUME = flags.DEFINE_bool("resume", False, "continue the run in train.output_dir from its newest intact checkpoint")
_PLAN = flags.DEFINE_string("plan", None, "compile the run's train step for this GPU or TPU chip (t4, l4, rtx4090, "
                             "rtx3090, rtx4060ti-16, a100-40, a100-80, h100, h200, v5e, v6e, v5p, v4, v3) without one, print "
                             "its memory, flops and a roofline estimate, and exit")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "delete the run in train.output_dir first, then start over")


def _fail(message: str) -> None:
    print(f"qst-train: error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_file(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_keys(argv: list[str]) -> list[str]:
    """The `--config.a.b=...` overrides whose key `a.b` is not in the schema (`train/config.py`)."""
    from qst_jax.train.config import base_config

    known, unknown = base_config(), []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node: object = known
        key = arg[len("--config."):].split("=", 1)[0]
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                unknown.append(key)
                break
            node = node[part]
    return unknown


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error for a missing config file, an unknown key or a bad value."""
    import os

    path = _config_file(argv)
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if path is None and overrides:
        _fail(f"{overrides[0]} overrides a key of a config file, but no --config was given: "
              "add --config configs/default.py (or another recipe) before it")
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        _fail(f"--config {path}: no such file (recipes are in configs/)")
    unknown = _unknown_keys(argv)
    if unknown:
        _fail(f"--config.{unknown[0]}: no such config key (every key and its default: qst_jax/train/config.py)")
    try:
        return flags.FLAGS(argv)
    except (flags.Error, OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        _fail(f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return []


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qst_jax.parallel.distributed import initialize_from_env

    initialize_from_env()  # several processes: QST_COORDINATOR, QST_NUM_PROCESSES, QST_PROCESS_ID
    from qst_jax.train.trainer import Trainer

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    if _PLAN.value:
        return _plan(config, _PLAN.value)
    try:
        trainer = Trainer(config, resume=_RESUME.value, overwrite=_OVERWRITE.value)
        summary = trainer.run()
    except (QSTError, ValueError) as err:  # ValueError: what a tokenizer or a data library raises
        print(f"qst-train: error: {err}", file=sys.stderr)
        return 1
    if "signal" in summary:
        return 128 + int(summary["signal"])
    frozen, after = summary.get("eval_frozen"), summary.get("eval_after")
    if frozen and after:
        print(
            f"held-out perplexity: frozen backbone {frozen['perplexity']:.2f} -> "
            f"{summary['method']} {after['perplexity']:.2f} after {summary['steps']} steps"
        )
    return 0


def _plan(config, name: str) -> int:
    """`--plan NAME`: the compiled step's figures for one GPU or TPU chip; nothing is loaded, nothing written."""
    from qst_jax.aot.targets import DoesNotFit, target
    from qst_jax.train.config import validate

    try:
        target(name)
        validate(config, planning=True)
        from qst_jax.train.plan import plan_run

        report, notes = plan_run(config, name)
    except DoesNotFit as err:  # an answer, as a GPU plan's "does NOT fit" is
        print(err)
        _print_next_step(config)
        return 0
    except (QSTError, ValueError) as err:
        print(f"qst-train: error: {err}", file=sys.stderr)
        return 1
    for note in notes:
        print(note)
    print(report.lines())
    if not report.fits:
        _print_next_step(config)
    return 0


def _print_next_step(config) -> None:
    """After a plan that does not fit: the offload that keeps more in host memory, where there is one."""
    one_device = config.parallel.data * config.parallel.fsdp * config.parallel.tensor == 1
    if not one_device:
        return
    if config.model.offload == "none":
        print("to fit: --config.model.offload=weights keeps the frozen layers in pinned host memory and streams "
              "them one layer ahead")
    elif config.model.offload == "weights" and config.method == "qst":
        print("to fit: --config.model.offload=weights+states also keeps the backbone states QST's backward reads "
              "in host memory (configs/chat_70b_16gb.py at 70B)")


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
