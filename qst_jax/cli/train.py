"""`qst-train --config configs/X.py [--config.train.lr=...] [--resume]`.

Trains a QST side network (or the QLoRA baseline) as the config says; see
README for the configs, data formats and the outputs of a run.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
_RESUME = flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in train.output_dir")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from qst_jax.parallel.distributed import initialize_from_env

    initialize_from_env()  # several processes: QST_COORDINATOR, QST_NUM_PROCESSES, QST_PROCESS_ID
    from qst_jax.data.offline import MissingPackageError
    from qst_jax.data.sources import DataError
    from qst_jax.models import CheckpointError, ConfigError
    from qst_jax.train.trainer import Trainer, TrainingError

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    try:
        trainer = Trainer(config)
        summary = trainer.run(resume=_RESUME.value)
    except (CheckpointError, ConfigError, DataError, MissingPackageError, TrainingError, ValueError) as err:
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


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
