import typing
from pathlib import Path

import pytest

from neuron import config as cfg


def test_yaml_then_dotted_flags_override_defaults(tmp_path):
    path = tmp_path / "miner.yaml"
    path.write_text("axon:\n  port: 9000\nmodel:\n  name: tiny\n")
    c = cfg.load(cfg.MinerConfig, path, cfg.parse_dotted(["--axon.port", "9001", "--logging.debug", "--auth.deny_hotkeys=a,b"]))
    assert c.axon.port == 9001 and c.model.name == "tiny" and c.logging.debug is True
    assert c.auth.deny_hotkeys == ("a", "b")
    assert c.limits == cfg.LimitsConfig()


def test_shipped_yaml_files_load_from_inside_the_package():
    # Package data: a wheel install carries them (pyproject's package-data), not only a checkout.
    assert cfg.CONFIG_DIR.parent == Path(cfg.__file__).parent
    for cls, name in [(cfg.MinerConfig, "miner"), (cfg.ValidatorConfig, "validator"), (cfg.MocknetConfig, "mocknet"),
                      (cfg.BenchConfig, "bench")]:
        path = cfg.default_yaml(name)
        assert path is not None and path.parent == cfg.CONFIG_DIR
        cfg.load(cls, path)
    assert 'defaults/*.yaml' in (Path(cfg.__file__).parents[1] / "pyproject.toml").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["--axon.prot", "1"], r"unknown option --axon.prot; did you mean --axon.port\?"),
    (["--port", "1"], r"did you mean --axon.port\?"),
    (["--logging.debgu"], r"did you mean --logging.debug\?"),
    (["--rounds", "1"], r"unknown option --rounds \(see --help\)"),
    (["--axon", "1"], "--axon is a section"),
    (["--axon.port", "eighty"], "axon.port: expected int"),
    (["--logging.debug", "maybe"], "expected true or false"),
    (["axon.port"], "unexpected argument"),
])
def test_bad_flags_say_which_and_why(argv, needle):
    with pytest.raises(cfg.ConfigError, match=needle):
        cfg.load(cfg.MinerConfig, None, cfg.parse_dotted(argv))


def test_bad_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("axon: [1, 2\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load(cfg.MinerConfig, path)
    with pytest.raises(cfg.ConfigError, match="missing.yaml does not exist"):
        cfg.load(cfg.MinerConfig, tmp_path / "missing.yaml")


def test_btcli_names_and_one_spelling_for_every_command():
    argv = ["--netuid", "5", "--subtensor.chain_endpoint", "ws://127.0.0.1:9944", "--logging.trace",
            "--logging.logging_dir", "/tmp/x"]
    for cls in (cfg.MinerConfig, cfg.ValidatorConfig, cfg.RegisterConfig, cfg.StakeConfig, cfg.MetagraphConfig):
        c = cfg.load(cls, None, cfg.parse_dotted(argv))
        assert c.subtensor.netuid == 5 and c.subtensor.chain_endpoint == "ws://127.0.0.1:9944"
        assert c.logging.trace is True and c.logging.logging_dir == "/tmp/x"
    # The mock network has its own subnet field: --netuid is that one there.
    assert cfg.load(cfg.MocknetConfig, None, {"netuid": "4"}).netuid == 4
    q = cfg.load(cfg.QueryConfig, None, cfg.parse_dotted(["--max-new-tokens", "3", "--timeout", "2"]))
    assert (q.max_new_tokens, q.timeout_s) == (3, 2.0)
    assert cfg.load(cfg.QueryConfig, None, cfg.parse_dotted(["--max_new_tokens=4"])).max_new_tokens == 4


def test_bench_flags_are_dotted_like_every_other_command():
    c = cfg.load(cfg.BenchConfig, cfg.default_yaml("bench"), cfg.parse_dotted(
        ["--bench.only", "forward,generate", "--bench.reps=2", "--bench.quick", "--engine.backend", "vllm",
         "--model.name", "tiny", "--bench.round-model", "same"]))
    assert c.bench.only == ("forward", "generate") and c.bench.reps == 2 and c.bench.quick
    assert (c.engine.backend, c.model.name, c.model.device, c.bench.round_model) == ("vllm", "tiny", "cpu", "same")
    assert c.engine.vllm.kv_cache_memory_bytes == 512 << 20  # the shipped defaults: room on a shared CPU
    with pytest.raises(cfg.ConfigError, match=r"did you mean --bench.reps\?"):
        cfg.load(cfg.BenchConfig, None, cfg.parse_dotted(["--reps", "2"]))  # the old spelling points to the new


CONFIGS = [cfg.MinerConfig, cfg.ValidatorConfig, cfg.MocknetConfig, cfg.RegisterConfig, cfg.StakeConfig,
           cfg.MetagraphConfig, cfg.WalletCommandConfig, cfg.QueryConfig, cfg.BenchConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_comment_and_appears_in_the_help(cls):
    from neuron import help as help_text

    text = help_text.render("x", cls)
    for name, typ in cfg.flag_names(cls).items():
        *section, leaf = name.split(".")
        owner = cls
        for part in section:
            owner = typing.get_type_hints(owner)[part]
        assert help_text.field_comments(owner).get(leaf), f"{owner.__name__}.{leaf} has no comment"
        assert f"--{name} " in text
    assert "(default: " in text


def test_the_deploy_environment_files_hold_valid_flags():
    import shlex

    deploy = Path(cfg.__file__).parents[1] / "deploy"
    for name, cls, var in (("miner", cfg.MinerConfig, "NEURON_MINER_ARGS"),
                           ("validator", cfg.ValidatorConfig, "NEURON_VALIDATOR_ARGS")):
        env = dict(line.split("=", 1) for line in (deploy / f"{name}.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
        c = cfg.load(cls, cfg.default_yaml(name), cfg.parse_dotted(shlex.split(shlex.split(env[var])[0])))
        assert c.metrics.port and c.metrics.ip == "127.0.0.1" and c.subtensor.netuid == 1
        unit = (deploy / "systemd" / f"neuron-{name}.service").read_text()
        assert f"EnvironmentFile=/etc/neuron/{name}.env" in unit and f"${var}" in unit


@pytest.mark.parametrize("cls, name", [(cfg.MinerConfig, "miner"), (cfg.ValidatorConfig, "validator"),
                                       (cfg.MocknetConfig, "mocknet")])
def test_one_default_per_field_the_shipped_yaml_agrees_with_the_dataclass(cls, name):
    # The YAML is the operator's annotated copy of the defaults: a value there that differs from the dataclass
    # would make the help, the code and a config-less run disagree (the validator's state path once did).
    assert cfg.load(cls, cfg.default_yaml(name)) == cls()


def test_a_partial_config_file_layers_on_the_shipped_defaults(tmp_path):
    partial = tmp_path / "mine.yaml"
    partial.write_text("axon:\n  port: 9000\nsubtensor:\n  netuid: 7\n")
    shipped = cfg.default_yaml("miner")
    c = cfg.load(cfg.MinerConfig, shipped, cfg.parse_dotted(["--axon.ip", "127.0.0.1"]), layers=(partial,))
    assert c.axon.port == 9000 and c.axon.ip == "127.0.0.1" and c.subtensor.netuid == 7
    base = cfg.load(cfg.MinerConfig, shipped)
    # Everything the partial file does not name keeps its shipped value, in the same section too.
    assert c.subtensor.network == base.subtensor.network and c.axon.grace_s == base.axon.grace_s
    assert c.model == base.model and c.limits == base.limits
    assert cfg.ValidatorConfig().state_path.endswith(".json")


def test_the_cli_lays_config_on_the_shipped_yaml(tmp_path):
    from neuron import cli

    partial = tmp_path / "validator.yaml"
    partial.write_text("sample_size: 4\n")
    c = cli._load(cfg.ValidatorConfig, "validator", ["--rounds", "2"], str(partial))
    assert c.sample_size == 4 and c.rounds == 2
    assert c.state_path == cfg.load(cfg.ValidatorConfig, cfg.default_yaml("validator")).state_path
    assert c.model.name == cfg.ModelConfig().name and c.subtensor == cfg.SubtensorConfig()
