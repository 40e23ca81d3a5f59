import pytest

from neuron import config as cfg


def test_yaml_then_dotted_flags_override_defaults(tmp_path):
    path = tmp_path / "miner.yaml"
    path.write_text("axon:\n  port: 9000\nmodel:\n  name: tiny\n")
    c = cfg.load(cfg.MinerConfig, path, cfg.parse_dotted(["--axon.port", "9001", "--logging.debug", "--auth.deny_hotkeys=a,b"]))
    assert c.axon.port == 9001 and c.model.name == "tiny" and c.logging.debug is True
    assert c.auth.deny_hotkeys == ("a", "b")
    assert c.limits == cfg.LimitsConfig()


def test_shipped_yaml_files_load():
    for cls, name in [(cfg.MinerConfig, "miner"), (cfg.ValidatorConfig, "validator")]:
        path = cfg.CONFIG_DIR / f"{name}.yaml"
        if path.exists():
            cfg.load(cls, path)


@pytest.mark.parametrize("argv, needle", [
    (["--axon.prot", "1"], "unknown option"),
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
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(cfg.MinerConfig, tmp_path / "missing.yaml")
