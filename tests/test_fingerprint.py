"""The checkpoint-file fingerprint both backends report."""

import shutil

import pytest

from neuron.fingerprint import checkpoint_dir, checkpoint_fingerprint
from neuron.model import TINY_PATH


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
