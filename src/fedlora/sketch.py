"""FSLoRA's sketch: which rank coordinates a client trains in a round (arXiv 2501.19389).

One index set per (round, client), shared by every module and by ``A`` and ``B``
of each module (the paper's construction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .seeding import torch_generator


def sketch_indices(seed: int, rnd: int, cid: int, rank: int, budget: int) -> Tensor:
    """``budget`` distinct indices of ``range(rank)``, uniform without replacement, sorted."""
    if not 0 < budget <= rank:
        raise ValueError(f"sketch budget must be in [1, {rank}], got {budget}")
    g = torch_generator(seed, "sketch", rnd, cid)
    return torch.randperm(rank, generator=g)[:budget].sort().values
