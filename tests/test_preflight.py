"""Start-up checks: each refusal names the flag to change, and nothing is loaded or created first."""

import os

import pytest
from loguru import logger

from conftest import make_wallet
from neuron import config as cfg
from neuron import preflight
from neuron.chain.local import LocalChain
from neuron.validator.state import State


def validator_config(tmp_path, **changes) -> cfg.ValidatorConfig:
    base = {"subtensor.network": "local", "subtensor.chain_path": str(tmp_path / "chain.db"),
            "wallet.name": "v", "wallet.path": str(tmp_path / "wallets"), "state_path": str(tmp_path / "s.json")}
    return cfg.load(cfg.ValidatorConfig, cfg.default_yaml("validator"), {**base, **changes})


@pytest.fixture
def chain_and_wallet(tmp_path):
    LocalChain(tmp_path / "chain.db").create_subnet(1)
    make_wallet(tmp_path / "wallets", "v")


def test_a_sound_validator_config_passes_and_the_state_directory_is_made(tmp_path, chain_and_wallet):
    c = validator_config(tmp_path, state_path=str(tmp_path / "new" / "dir" / "state.json"))
    preflight.validator(c)
    assert (tmp_path / "new" / "dir").is_dir()


@pytest.mark.parametrize("changes, needle", [
    ({"subtensor.chain_path": "/nonexistent/chian.db"}, "--subtensor.chain_path: local chain /nonexistent/chian.db does not exist"),
    ({"subtensor.network": "none"}, "needs a chain: set --subtensor.network"),
    ({"wallet.name": "nobody"}, "--wallet.name nobody: no wallet at"),
    ({"wallet.hotkey": "typo"}, "--wallet.hotkey typo: no hotkey file at .*this wallet has: default"),
    ({"subtensor.chain_endpoint": "http://x"}, "--subtensor.chain_endpoint http://x: expected ws://"),
    ({"model.name": "tiny-gpt-neo", "model.dtype": "float16"}, "--model.dtype float16: GPT-Neo in float16"),
])
def test_validator_chain_and_wallet_refusals_name_the_flag(tmp_path, chain_and_wallet, changes, needle):
    with pytest.raises(cfg.ConfigError, match=needle):
        preflight.validator(validator_config(tmp_path, **changes))


def test_the_state_path_is_tried_before_the_model_loads(tmp_path, chain_and_wallet):
    as_dir = tmp_path / "a_dir"
    as_dir.mkdir()
    with pytest.raises(cfg.ConfigError, match=r"--state_path .*a_dir is not a file"):
        preflight.validator(validator_config(tmp_path, state_path=str(as_dir)))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(cfg.ConfigError, match=r"--state_path: validator state .*broken.json is unreadable"):
        preflight.validator(validator_config(tmp_path, state_path=str(broken)))
    under_a_file = tmp_path / "s.json" / "state.json"
    State().save(tmp_path / "s.json")  # a readable state file resumes
    preflight.validator(validator_config(tmp_path))
    with pytest.raises(cfg.ConfigError, match=r"--state_path .*cannot create the directory"):
        preflight.validator(validator_config(tmp_path, state_path=str(under_a_file)))
    if os.getuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(cfg.ConfigError, match=r"--state_path .*not writable by this user"):
            preflight.validator(validator_config(tmp_path, state_path=str(locked / "state.json")))


def miner_config(tmp_path, **changes) -> cfg.MinerConfig:
    base = {"subtensor.network": "local", "subtensor.chain_path": str(tmp_path / "chain.db"),
            "wallet.name": "v", "wallet.path": str(tmp_path / "wallets")}
    return cfg.load(cfg.MinerConfig, cfg.default_yaml("miner"), {**base, **changes})


@pytest.fixture
def warnings():
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def test_a_loopback_miner_on_a_local_chain_publishes_loopback(tmp_path, chain_and_wallet, warnings):
    c = preflight.miner(miner_config(tmp_path, **{"axon.ip": "127.0.0.1"}))
    assert c.axon.external_ip == "127.0.0.1" and not warnings
    public = preflight.miner(miner_config(tmp_path, **{"axon.ip": "0.0.0.0"}))
    assert public.axon.external_ip == ""  # the first non-loopback address, found when it is published


def test_a_loopback_miner_on_a_shared_chain_is_refused_or_warned(tmp_path, chain_and_wallet, warnings):
    remote = {"subtensor.network": "finney", "axon.ip": "127.0.0.1"}
    with pytest.raises(cfg.ConfigError, match="--axon.ip 127.0.0.1 is loopback: validators on other machines"):
        preflight.miner(miner_config(tmp_path, **remote))
    proxied = preflight.miner(miner_config(tmp_path, **remote, **{"axon.external_ip": "203.0.113.7"}))
    assert proxied.axon.external_ip == "203.0.113.7"
    [line] = warnings
    assert "--axon.ip 127.0.0.1 is loopback but --axon.external_ip 203.0.113.7 is published" in line
    with pytest.raises(cfg.ConfigError, match="--axon.external_ip my-host: not an IP address"):
        preflight.miner(miner_config(tmp_path, **{"axon.external_ip": "my-host"}))


def test_a_chainless_dev_miner_needs_no_wallet(tmp_path):
    c = miner_config(tmp_path, **{"subtensor.network": "none", "auth.required": "false", "wallet.name": "nobody",
                                  "axon.ip": "127.0.0.1"})
    assert preflight.miner(c) == c
    with pytest.raises(cfg.ConfigError, match="--wallet.name nobody"):
        preflight.miner(miner_config(tmp_path, **{"subtensor.network": "none", "wallet.name": "nobody"}))


@pytest.mark.parametrize("flags, needle", [
    ({"model.dtype": "float16", "model.name": "tiny-gpt-neo"}, "--model.dtype float16: GPT-Neo in float16"),
    ({"model.dtype": "bfloat16"}, "--model.dtype bfloat16: bfloat16 answers"),
    ({"engine.backend": "vllm", "engine.vllm.dtype": "bfloat16"}, "--engine.vllm.dtype bfloat16: bfloat16 answers"),
])
def test_a_precision_that_fails_verification_is_refused_before_the_load(tmp_path, flags, needle):
    base = {"subtensor.network": "none", "auth.required": "false", "axon.ip": "127.0.0.1"}
    with pytest.raises(cfg.ConfigError, match=needle):
        preflight.miner(miner_config(tmp_path, **base, **flags))
    for fine in ({"model.dtype": "float16", "model.name": "tiny"}, {"model.name": "tiny-gpt-neo"}):
        preflight.miner(miner_config(tmp_path, **base, **fine))  # tiny OPT in float16, GPT-Neo on auto: served
