"""Tests of the prompt sources, with a real byte-level BPE tokenizer trained on the corpus."""

import random

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from neuron.dataset import PromptSource


@pytest.fixture(scope="module")
def source():
    return PromptSource.default()


@pytest.fixture(scope="module")
def tokenizer(source):
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(source.paragraphs, trainer)
    # Like OPT's tokenizer, put a BOS in front of every encoding.
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_default_corpus(source):
    assert 40 <= len(source) <= 80
    assert 20_000 <= sum(len(p) for p in source.paragraphs) <= 40_000
    assert all(p == p.strip() and p for p in source.paragraphs)


def test_sample_span_bounds_and_word_boundaries(source):
    rng = random.Random(0)
    for _ in range(200):
        span = source.sample_span(rng, 50, 200)
        assert 1 <= len(span) <= 200
        para = next(p for p in source.paragraphs if span in p)
        i = para.index(span)
        assert i == 0 or para[i - 1].isspace()
        end = i + len(span)
        assert end == len(para) or para[end].isspace()


def test_sample_span_deterministic_and_seed_dependent(source):
    a = [source.sample_span(random.Random(7), 40, 300) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    spans = {source.sample_span(random.Random(seed), 40, 300) for seed in range(10)}
    assert len(spans) == 10


def test_sample_span_short_paragraphs_whole():
    src = PromptSource(["one two three", "four five"])
    assert src.sample_span(random.Random(0), 100, 200) in {"one two three", "four five"}
    with pytest.raises(ValueError):
        src.sample_span(random.Random(0), 0, 10)
    with pytest.raises(ValueError):
        src.sample_span(random.Random(0), 20, 10)


def test_from_txt(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First paragraph\nstill first.\n\n  \n\nSecond one.\n", encoding="utf-8")
    assert PromptSource.from_file(path).paragraphs == ("First paragraph\nstill first.", "Second one.")


def test_from_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "alpha beta"}\n\n{"text": "gamma", "id": 3}\n', encoding="utf-8")
    assert PromptSource.from_file(path).paragraphs == ("alpha beta", "gamma")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.jsonl", '{"text": "ok"}\n{"text": \n', r"c\.jsonl:2: bad JSON"),
        ("c.jsonl", '{"text": "ok"}\n{"body": "x"}\n',
         r'c\.jsonl:2: expected an object with a string "text"'),
        ("c.jsonl", '["text"]\n', r"c\.jsonl:1: expected an object"),
        ("c.jsonl", "", "no text"),
        ("c.txt", "\n \n\n", "no text"),
        ("c.csv", "a,b\n", "expected a .txt or .jsonl file"),
    ],
)
def test_from_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        PromptSource.from_file(path)
