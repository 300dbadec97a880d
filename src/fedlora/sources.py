"""A data set's raw rows, wherever they are: the built-in corpora, CSV/JSON/JSONL files (read here,
so that a bad line is named), or anything 🤗 datasets loads (parquet and arrow files, directories
written by ``save_to_disk``, local data folders, hub ids), with its own test split when it has one.

Every bad input is one :class:`ConfigError` naming the file (and the line) and what it holds.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .errors import ConfigError, check
from .resources import BUILTIN_DATA, builtin_path

OWN_READERS = (".csv", ".json", ".jsonl")
DATASETS_FILES = (".parquet", ".arrow")
# json's decoder recurses once per nesting level: a hostile file can exhaust Python's stack
TOO_DEEP = "nests too deeply for Python's JSON reader (lists or objects nested thousands deep)"


@dataclass
class Rows:
    """The rows of a data set's training split and, when it has one, of its own test split."""

    train: list[dict]
    test: list[dict] | None
    where: str  # the file or data set, for messages
    lines: list[int] | None = None  # the file line of every training row (CSV, JSON lines)

    @property
    def columns(self) -> list[str]:
        """The columns of the first row (every row of a 🤗 data set has the same)."""
        return sorted(self.train[0]) if self.train else []

    def locate(self, i: int) -> str:
        """Where training row ``i`` is, for a message: ``file line 7`` or ``name row 6``."""
        return f"{self.where} line {self.lines[i]}" if self.lines else f"{self.where} row {i}"


def read_rows(cfg: DataConfig) -> Rows:
    """The rows ``data.name`` holds (see the module docstring), duplicates dropped if asked."""
    if cfg.name in BUILTIN_DATA:
        rows = Rows(_read_builtin(builtin_path(cfg.name, BUILTIN_DATA, "data.name")), None, cfg.name)
    else:
        path = Path(cfg.name).expanduser()
        local = cfg.name.startswith((".", "/", "~")) or path.suffix in OWN_READERS + DATASETS_FILES or path.exists()
        if local and not path.exists():
            raise ConfigError(f"data.name: file not found: {path}")
        if path.suffix in OWN_READERS and path.is_file():
            train, lines = _READERS[path.suffix](path)
            rows = Rows(train, None, str(path), lines)
        else:
            rows = _from_datasets(cfg, path if local else None)
    if not rows.train:
        raise ConfigError(f"data.name: {rows.where} has no rows")
    return deduplicate(rows) if cfg.deduplicate else rows


def deduplicate(rows: Rows) -> Rows:
    """Each distinct row once (its first occurrence); training rows that repeat a test row are dropped."""
    seen = {_key(r) for r in rows.test or []}
    keep = []
    for i, r in enumerate(rows.train):
        if (k := _key(r)) not in seen:
            seen.add(k)
            keep.append(i)
    lines = [rows.lines[i] for i in keep] if rows.lines else None
    return Rows([rows.train[i] for i in keep], rows.test, rows.where, lines)


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def _read_builtin(path: Path) -> list[dict]:
    """A built-in corpus, read as it always was (the sentiment CSV holds a few non-UTF-8 bytes)."""
    if path.is_dir():
        return _read_dialogs(path)
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        return list(csv.DictReader(f))


def _read_dialogs(folder: Path) -> list[dict]:
    """Rows {text, prompt, answer, topic} from YAML files of ``conversations`` lists: each
    dialog's opening line and its first reply."""
    import yaml

    rows = []
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            if len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                rows.append({"text": f"{conv[0]} {conv[1]}", "prompt": conv[0], "answer": conv[1],
                             "topic": f.stem})
    return rows


def _text(path: Path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped; anything else is one line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"data.name: {path} is not UTF-8 (byte 0x{data[e.start]:02x} on line {line}; "
                          "latin-1?): save it as UTF-8") from None


def _read_csv(path: Path) -> tuple[list[dict], list[int]]:
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    try:
        header = next(reader, [])
        rows, lines = [], []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise ConfigError(f"data.name: {path} line {reader.line_num} has {len(fields)} fields, its header "
                                  f"{len(header)} ({', '.join(header)})")
            rows.append(dict(zip(header, fields)))
            lines.append(reader.line_num)
    except csv.Error as e:
        raise ConfigError(f"data.name: {path} line {reader.line_num} is not valid CSV ({e})") from None
    return rows, lines


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data.name: {path} line {n} is not valid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise ConfigError(f"data.name: {path} line {n} {TOO_DEEP}") from None
        check("data.name", isinstance(row, dict),
              f"{path} line {n} is a JSON {type(row).__name__}, not an object of columns")
        rows.append(row)
        lines.append(n)
    return rows, lines


def _read_json(path: Path) -> tuple[list[dict], list[int] | None]:
    """A JSON list of objects (or JSON lines in a .json file, as 🤗 datasets accepts)."""
    text = _text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return _read_jsonl(path)
        raise ConfigError(f"data.name: {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise ConfigError(f"data.name: {path} {TOO_DEEP}") from None
    check("data.name", isinstance(doc, list), f"{path} holds a JSON {type(doc).__name__}; expected a list of objects")
    bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None)
    check("data.name", bad is None, f"item {bad} of {path} is not an object of columns")
    return doc, None


_READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json}


def _from_datasets(cfg: DataConfig, path: Path | None) -> Rows:
    """A hub id (``path`` None), a parquet/arrow file, or a directory, through 🤗 datasets."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.name: loading {cfg.name!r} needs 🤗 datasets: pip install datasets") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    saved = path is not None and path.is_dir() and any((path / f).is_file()
                                                       for f in ("dataset_dict.json", "state.json"))
    check("data.subset", not cfg.subset or not (saved or (path is not None and path.is_file())),
          f"{path} is one data set; it has no subsets")
    try:
        if saved:
            loaded = datasets.load_from_disk(str(path))
        elif path is not None and path.is_file():
            check("data.name", path.suffix in DATASETS_FILES, f"{path}: unknown file type {path.suffix!r} (use one of "
                  f"{', '.join(OWN_READERS + DATASETS_FILES)}, a saved 🤗 data set directory or a hub id)")
            loaded = datasets.load_dataset(path.suffix[1:], data_files=str(path))
        else:
            loaded = datasets.load_dataset(str(path or cfg.name), cfg.subset or None)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types (connection, missing config, bad files): one line each
        key = "data.subset" if cfg.subset and "config" in str(e).lower() else "data.name"
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: 🤗 datasets cannot load {cfg.name!r}: {message}") from None
    return _splits(loaded, cfg, str(path or cfg.name))


def _splits(loaded, cfg: DataConfig, where: str) -> Rows:
    """The training split and the test split of a DatasetDict (a single Dataset has no test split)."""
    if not hasattr(loaded, "keys"):  # one Dataset
        check("data.test_split", cfg.test_split in ("", "none"), f"{where} has no splits")
        return Rows(loaded.to_list(), None, where)
    splits = sorted(loaded.keys())
    check("data.split", cfg.split in loaded, f"{where} has no split '{cfg.split}' (its splits: {', '.join(splits)})")
    test_name = cfg.test_split or ("test" if "test" in loaded and cfg.split != "test" else "none")
    if test_name != "none":
        check("data.test_split", test_name in loaded, f"{where} has no split '{test_name}' (its splits: "
              f"{', '.join(splits)})")
        check("data.test_split", test_name != cfg.split, f"'{test_name}' is data.split too: hold out another split")
    test = loaded[test_name].to_list() if test_name != "none" else None
    return Rows(loaded[cfg.split].to_list(), test, f"{where}[{cfg.split}]")
