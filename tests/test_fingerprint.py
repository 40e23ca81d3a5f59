"""The checkpoint-file fingerprint both backends report."""

import json
import shutil

import pytest

from neuron.fingerprint import checkpoint_dir, checkpoint_fingerprint, checkpoint_quantization, quantization_of
from neuron.model import TINY_MODELS, TINY_PATH


def test_same_files_same_fingerprint_and_any_change_shows(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(TINY_PATH, a)
    shutil.copytree(TINY_PATH, b)
    (b / "config.json").write_text("{}")  # not a weights file: ignored
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b) == checkpoint_fingerprint(TINY_PATH)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint_fingerprint(b) != checkpoint_fingerprint(a)
    (a / "model.safetensors").rename(a / "other.safetensors")  # the names count too
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(TINY_PATH)


def test_a_directory_without_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint_fingerprint(tmp_path)


def test_a_local_directory_is_its_own_checkpoint_dir():
    assert checkpoint_dir(str(TINY_PATH)) == TINY_PATH


@pytest.mark.parametrize("config, declared", [
    ({}, ""),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
     "bnb-4bit-nf4"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "_load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                              "bnb_4bit_use_double_quant": True}}, "bnb-4bit-fp4-dq"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "bnb-8bit"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "gptq-4bit"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
])
def test_the_declared_quantization_is_named_from_the_config(config, declared):
    assert quantization_of(config) == declared


def test_the_same_files_declared_with_another_quantization_are_another_model(tmp_path):
    plain, four = tmp_path / "plain", tmp_path / "four"
    shutil.copytree(TINY_MODELS["tiny-gpt-neo"], plain)
    shutil.copytree(TINY_MODELS["tiny-gpt-neo"], four)
    config = json.loads((four / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (four / "config.json").write_text(json.dumps(config))
    assert checkpoint_quantization(plain) == "" and checkpoint_quantization(four) == "bnb-8bit"
    # An unquantized checkpoint keeps the fingerprint of its files alone (as before quantization was declared).
    assert checkpoint_fingerprint(plain) == checkpoint_fingerprint(TINY_MODELS["tiny-gpt-neo"])
    assert checkpoint_fingerprint(four) != checkpoint_fingerprint(plain)
    assert checkpoint_quantization(TINY_MODELS["tiny-gpt-neo-4bit"]) == "bnb-4bit-nf4"
