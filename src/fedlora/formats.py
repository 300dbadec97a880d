"""Rows -> conversations, for the generative data formats (``data.format``).

Every format becomes a list of ``{role, content}`` messages whose assistant turns are the answers:
``instruction`` and ``prompt-completion`` rows are one user turn and one assistant turn (the
instruction and its optional input joined, as Alpaca does); ``messages`` rows are taken as they are
(a JSON string, as a CSV cell holds it, is parsed). ``data.columns`` names a field's column.
"""

from __future__ import annotations

import json

from .config import FORMAT_FIELDS, DataConfig
from .errors import ConfigError, check
from .sources import Rows

Conversation = list[dict[str, str]]
OPTIONAL = {"input"}  # fields a row may lack


def column(cfg: DataConfig, field: str) -> str:
    return cfg.columns.get(field, field)


def check_columns(rows: Rows, cfg: DataConfig) -> None:
    """Every required field's column is in the data: else one line naming it and the columns there."""
    for field in FORMAT_FIELDS[cfg.format]:
        col = column(cfg, field)
        if field not in OPTIONAL and col not in rows.train[0]:
            renamed = field in cfg.columns
            hint = "" if renamed else f"; name yours with data.columns = {{{field} = \"...\"}}"
            raise ConfigError(f"data.columns{'.' + field if renamed else ''}: data.format = \"{cfg.format}\" needs a "
                              f"column '{col}' and {rows.where} has none (columns: {', '.join(rows.columns)}){hint}")


def conversations(rows: list[dict], cfg: DataConfig, locate) -> list[Conversation]:
    """One conversation per row; ``locate(i)`` says where row ``i`` is (for messages)."""
    if cfg.format == "messages":
        col = column(cfg, "messages")
        return [_messages(r.get(col), col, locate(i)) for i, r in enumerate(rows)]
    prompt, answer = ("instruction", "output") if cfg.format == "instruction" else ("prompt", "completion")
    out = []
    for i, r in enumerate(rows):
        text = _field(r, column(cfg, prompt), locate, i)
        extra = r.get(column(cfg, "input")) if cfg.format == "instruction" else None
        if extra is not None and str(extra).strip():
            text = f"{text}\n\n{extra}"
        out.append([{"role": "user", "content": text},
                    {"role": "assistant", "content": _field(r, column(cfg, answer), locate, i)}])
    return out


def _field(row: dict, col: str, locate, i: int) -> str:
    value = row.get(col)
    if value is None:
        raise ConfigError(f"data: {locate(i)} has no '{col}' (its keys: {', '.join(sorted(row))})")
    return str(value)


def _messages(value, col: str, where: str) -> Conversation:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"data: {where}: column '{col}' is text, not a JSON list of messages") from None
    check("data", isinstance(value, list) and len(value) > 0,
          f"{where}: column '{col}' must be a list of {{role, content}} messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        check("data", ok, f"{where}: message {j} must be an object with text 'role' and 'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    check("data", any(m["role"] == "assistant" for m in out), f"{where}: no assistant message to learn")
    return out
