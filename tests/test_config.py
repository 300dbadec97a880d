import pytest

from fedlora.config import ConfigError, default_config_path, load_config, parse_override


def test_default_config_loads_and_is_the_documented_setup():
    cfg = load_config(default_config_path())
    assert cfg.strategy.name == "fslora" and cfg.strategy.global_rank == 64
    assert cfg.budgets.ranks == [8, 16, 32] and cfg.data.alpha == 0.1
    assert cfg.data.num_clients >= 10


@pytest.mark.parametrize("override, key", [
    ("strategy.nmae=fslora", "strategy.nmae"),
    ("bogus=1", "bogus"),
    ("strategy.global_rank=0", "strategy.global_rank"),
    ("budgets.ranks=[8, 128]", "budgets.ranks"),
    ("budgets.ranks=[0, 4]", "budgets.ranks"),
    ("federation.fraction=1.5", "federation.fraction"),
    ("federation.fraction=0", "federation.fraction"),
    ("train.lr=fast", "train.lr"),
    ("train.optimizer=rmsprop", "train.optimizer"),
    ("data.partition=random", "data.partition"),
    ("strategy.rslora=1", "strategy.rslora"),
    ("federation.clients_per_round=99", "federation.clients_per_round"),
    ("budgets.per_client=[8, 8]", "budgets.per_client"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(default_config_path(), [override])


def test_overrides_are_typed_and_ints_widen_to_float():
    cfg = load_config(None, ["strategy.alpha=32", "train.lr=1e-4", "model.targets=[\"q_proj\"]",
                             "output_dir=/tmp/x"])
    assert cfg.strategy.alpha == 32.0 and isinstance(cfg.strategy.alpha, float)
    assert cfg.train.lr == 1e-4 and cfg.model.targets == ["q_proj"] and cfg.output_dir == "/tmp/x"


def test_parse_override_rejects_missing_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("strategy.name")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[strategy\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("override, key", [
    ("privacy.clip_norm=-1.0", "privacy.clip_norm"),
    ("privacy.noise_multiplier=1.0", "privacy.noise_multiplier"),
    ("federation.fraction=0.0", "federation.fraction"),
    ("budgets.ranks=[8, 65]", "budgets.ranks"),
    ("reliability.dropout=1.0", "reliability.dropout"),
])
def test_malformed_privacy_and_reliability_configs_fail_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_the_default_jobs_auto_partition_is_label_skewed_for_labels_and_iid_for_instructions():
    """Changing the default job's data format alone must not leave a split by classes that the data lacks."""
    assert load_config(default_config_path()).data.partition == "dirichlet-balanced"
    cfg = load_config(default_config_path(), ['data.format="instruction"'])
    assert cfg.data.partition == "iid"
    assert load_config(default_config_path(), ['data.format="instruction"', 'data.partition="group"']
                       ).data.partition == "group"  # an explicit split still wins
