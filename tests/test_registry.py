"""The method registry: a method defined outside fedlora joins with one call, runs in
`fedlora compare`, and gets its own settings table; a table for another method is refused."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from fedlora.cli import main
from fedlora.config import ConfigError, load_config
from fedlora.methods import METHODS, BuildContext, Method, register
from fedlora.state import clone, from_plain, init_factors, lora_scale, round_weights, to_plain, weighted_sum
from fedlora.types import ClientTask

from .conftest import tiny_overrides

BUILT: list[BuildContext] = []


@dataclass
class ToySettings:
    shrink: float = 1.0  # the aggregate is multiplied by this
    flavour: Literal["plain", "fancy"] = "plain"


class Toy:
    """FedAvg on factors at rank 2, with the aggregate scaled by ``shrink``."""

    name = "toy"

    def __init__(self, c: BuildContext) -> None:
        self.shrink = c.settings.shrink
        self.scale = lora_scale(c.alpha, 2)
        self.factors = init_factors(c.shapes, 2, torch.Generator().manual_seed(c.seed))

    def configure(self, rnd, clients):
        return {c.cid: ClientTask(factors=clone(self.factors), scale=self.scale) for c in clients}

    def aggregate(self, rnd, updates):
        cids, w = round_weights(updates)
        self.factors = weighted_sum([updates[c].factors for c in cids], [x * self.shrink for x in w])
        return {"toy_metric": 1.0}

    def global_task(self):
        return ClientTask(factors=clone(self.factors), scale=self.scale)

    def state_dict(self):
        return {"factors": to_plain(self.factors)}  # plain: dicts, lists, tensors, scalars

    def load_state_dict(self, sd):
        self.factors = from_plain(sd["factors"])


def build_toy(c: BuildContext) -> Toy:
    BUILT.append(c)
    return Toy(c)


@pytest.fixture
def toy():
    register(Method("toy", build_toy, "Toy: FedAvg at rank 2, shrunk.", settings=ToySettings))
    BUILT.clear()
    yield
    METHODS.pop("toy")


def test_a_registered_method_runs_in_compare_with_its_own_settings(toy, tiny_bert_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", *tiny_overrides(tiny_bert_dir, tmp_path / "unused"), "strategy.toy.shrink=0.5",
            "--methods", "fslora,toy", "--seeds", "0", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "| toy |" in (out / "results.md").read_text() and "| fslora |" in (out / "results.md").read_text()
    assert [c.settings for c in BUILT] == [ToySettings(shrink=0.5)]  # the toy got its own table
    toy_config = (out / "toy-seed0" / "config.toml").read_text()
    assert "[strategy.toy]" in toy_config and "shrink = 0.5" in toy_config
    assert "[strategy.toy]" not in (out / "fslora-seed0" / "config.toml").read_text()  # fslora's run: its own
    rows = [json.loads(x) for x in (out / "toy-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["toy_metric"] == 1.0


def test_a_table_for_a_method_that_is_not_running_is_one_line(toy, tiny_bert_dir, tmp_path, capsys):
    args = ["compare", *tiny_overrides(tiny_bert_dir, tmp_path / "unused"), 'strategy.flexlora.sigma_split="all-in-B"',
            "--methods", "fslora,toy", "--seeds", "0", "--out", str(tmp_path / "cmp"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "strategy.flexlora" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="strategy.toy: settings of method 'toy', but this run uses 'fslora'"):
        load_config(None, ["strategy.toy.shrink=0.5"])


def test_a_method_settings_table_is_type_checked(toy):
    cfg = load_config(None, ['strategy.name="toy"', 'strategy.toy.flavour="fancy"'])
    assert cfg.strategy.method_settings() == ToySettings(flavour="fancy")
    assert load_config(None, ['strategy.name="toy"']).strategy.method_settings() == ToySettings()
    with pytest.raises(ConfigError, match="strategy.toy.flavour: must be one of plain, fancy"):
        load_config(None, ['strategy.name="toy"', 'strategy.toy.flavour="odd"'])
    with pytest.raises(ConfigError, match="unknown config key 'strategy.toy.bogus'"):
        load_config(None, ['strategy.name="toy"', "strategy.toy.bogus=1"])


def test_registering_a_second_method_of_the_same_name_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        register(Method("toy", build_toy, "another toy"))


@pytest.mark.parametrize("old, new", [("strategy.server_optimizer=\"adam\"", "[strategy.fslora] server_optimizer"),
                                      ("strategy.sigma_split=\"all-in-B\"", "[strategy.flexlora] sigma_split"),
                                      ("strategy.hetlora_norm_weighted=true", "[strategy.hetlora] norm_weighted")])
def test_an_old_config_key_names_its_new_place(old, new):
    with pytest.raises(ConfigError, match="has moved: set it as " + re.escape(new)):
        load_config(None, [old])


def test_dp_noise_is_refused_at_load_for_methods_and_settings_that_cannot_take_it():
    privacy = ["privacy.noise_multiplier=1.0", "privacy.dp_clip=1.0"]
    with pytest.raises(ConfigError, match="privacy.noise_multiplier: flexlora cannot take DP noise"):
        load_config(None, ['strategy.name="flexlora"', *privacy])
    with pytest.raises(ConfigError, match='server_optimizer = "sgd"'):
        load_config(None, ['strategy.fslora.server_optimizer="adam"', *privacy])
    assert load_config(None, privacy).privacy.noise_multiplier == 1.0
