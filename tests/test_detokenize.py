"""Incremental text at the edge: split characters held back, stop strings cut, deltas add up."""

from neuron.detokenize import Detokenizer


def deltas_of(tok, ids: list[int], stop=()) -> tuple[list[str], Detokenizer]:
    d, out = Detokenizer(tok, stop), []
    for i, t in enumerate(ids):
        out.append(d.add(t, last=i == len(ids) - 1))
        if d.stopped:
            break
    return out, d


def test_text_deltas_hold_back_split_characters_and_add_up_to_the_decoded_text(tiny):
    text = "héllo wörld 日本語 ok"
    ids = tiny.tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tiny.tokenizer.decode([i]) for i in ids)  # characters split across tokens
    deltas, _ = deltas_of(tiny.tokenizer, ids)
    assert "".join(deltas) == tiny.tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_a_stop_string_across_tokens_ends_the_text_before_it(tiny):
    ids = tiny.tokenizer("hello world, goodbye", add_special_tokens=False).input_ids
    deltas, d = deltas_of(tiny.tokenizer, ids, ("zzz", "d, g"))
    # "d" and "d," were held back as the start of a stop string, and never sent.
    assert d.stopped and "".join(deltas) == "hello worl" == d.text


def test_text_held_back_for_a_stop_string_is_sent_when_the_generation_ends(tiny):
    ids = tiny.tokenizer("hello world", add_special_tokens=False).input_ids
    deltas, d = deltas_of(tiny.tokenizer, ids, ("d, g",))
    assert not d.stopped and "".join(deltas) == "hello world" and deltas[-1].endswith("d")
