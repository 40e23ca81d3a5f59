import asyncio
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import HAS_QUANTIZED, needs_quantized
from neuron.errors import InvalidArgument
from neuron.fingerprint import checkpoint_fingerprint
from neuron.model import TINY_MODELS, ForwardJob, ModelNotFound, forward_batch, forward_topk, load_model

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_ships_in_the_package_and_is_small(tiny):
    assert tiny.vocab_size == 512 and tiny.tokenizer.padding_side == "left"
    assert sum(p.numel() for p in tiny.model.parameters()) < 200_000
    assert len(tiny.weights_fingerprint) == 64


def test_a_missing_model_names_what_was_looked_for(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="no-such-org/no-such-model.*HF_HUB_OFFLINE=1"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_padded_batch_forward_matches_each_row_alone(lm):
    tok = lm.tokenizer
    jobs = [ForwardJob(torch.tensor([tok("a short one").input_ids]), None, 5),
            ForwardJob(torch.tensor([tok("a much longer sentence than the first").input_ids]), [0, 2], 5, True)]
    batched = forward_batch(lm, jobs)
    for job, out in zip(jobs, batched):
        alone = forward_topk(lm, job.input_ids, job.positions, job.topk, job.want_hidden)
        assert torch.equal(out.topk_ids, alone.topk_ids)
        assert torch.allclose(out.topk_logprobs, alone.topk_logprobs, atol=1e-4)
        assert torch.allclose(out.rest_mass, 1 - alone.topk_logprobs.exp().sum(-1), atol=1e-5)
    assert batched[1].hidden.shape == (1, 2, lm.model.config.hidden_size)


def test_forward_runs_the_lm_head_only_where_asked_and_agrees_with_the_full_pass(lm):
    from neuron.harness.cheats import cheat_model
    from neuron.model import _body_and_head, forward_logprobs

    assert _body_and_head(lm.model) is not None  # OPT and Llama: the head can run on a few positions
    ids = torch.randint(3, lm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = forward_topk(lm, ids, [1, 5, 11], 5, want_hidden=True)
    full, hidden = forward_logprobs(lm, ids, want_hidden=True)
    values, top = full[:, [1, 5, 11]].topk(5)
    assert torch.equal(out.topk_ids, top) and torch.allclose(out.topk_logprobs, values, atol=1e-5)
    assert torch.allclose(out.hidden, hidden[:, [1, 5, 11]], atol=1e-5)
    # A wrapper that rewrites logits must run whole, or a cheating miner's Forward would be honest.
    noisy = cheat_model("noise", lm)
    assert _body_and_head(noisy.model) is None
    assert not torch.equal(forward_topk(noisy, ids, [1], 5).topk_logprobs, out.topk_logprobs[:, :1])


def test_forward_in_chunks_of_positions_equals_one_chunk(tiny, monkeypatch):
    import neuron.model

    ids = torch.randint(3, tiny.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    whole = forward_topk(tiny, ids, None, 4, want_hidden=True)
    monkeypatch.setattr(neuron.model, "HEAD_CHUNK", 7)  # 30 positions: chunks of 7, the last of 2
    chunked = forward_topk(tiny, ids, None, 4, want_hidden=True)
    assert torch.equal(chunked.topk_ids, whole.topk_ids)
    assert torch.allclose(chunked.topk_logprobs, whole.topk_logprobs, atol=1e-6)
    assert torch.equal(chunked.hidden, whole.hidden)


def greedy_tail(lm, text: str, n: int) -> list[int]:
    """The prompt followed by n greedy tokens: each of those is the top-1 at the position before it."""
    ids = torch.tensor([lm.tokenizer(text).input_ids])
    return lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)[0].tolist()


def next_token_logprobs(lm, row: list[int], positions) -> torch.Tensor:
    """log_softmax(model(ids).logits)[p, ids[p + 1]] at each position: the plain full-vocabulary reference."""
    with torch.inference_mode():
        lp = torch.log_softmax(lm.model(torch.tensor([row])).logits[0].float(), dim=-1)
    return torch.stack([lp[p, row[p + 1]] for p in positions])


def test_token_logprobs_are_the_next_input_tokens_in_and_outside_the_topk(lm):
    row = greedy_tail(lm, "The capital of France is", 6)
    other = lm.tokenizer("a much longer sentence than the first one, asked alone").input_ids
    two = [row[:5], row[3:8]]
    jobs = [ForwardJob(torch.tensor([row]), tuple(range(len(row) - 1)), 3, want_token_logprobs=True),
            ForwardJob(torch.tensor([other]), None, 3),  # longer: the others are left-padded
            ForwardJob(torch.tensor(two), (3, 0, 2), 2, want_token_logprobs=True)]
    first, plain, pair = forward_batch(lm, jobs)
    positions = list(range(len(row) - 1))
    assert first.token_logprobs.shape == (1, len(positions)) and first.token_logprobs.dtype == torch.float32
    assert torch.allclose(first.token_logprobs[0], next_token_logprobs(lm, row, positions), atol=1e-5)
    match = first.topk_ids[0] == torch.tensor(row[1:])[:, None]
    inside = match.any(-1)
    assert inside.any() and not inside.all()  # the greedy tail is top-1; most of the prompt is not
    assert torch.allclose(first.token_logprobs[0][inside], first.topk_logprobs[0][match], atol=1e-6)
    assert plain.token_logprobs is None
    for b in range(2):
        assert torch.allclose(pair.token_logprobs[b], next_token_logprobs(lm, two[b], (3, 0, 2)), atol=1e-5)


def test_token_logprobs_where_there_is_no_next_token_are_refused(tiny):
    ids = torch.tensor([tiny.tokenizer("hello there").input_ids])
    for positions in (None, [0, ids.shape[1] - 1]):
        with pytest.raises(InvalidArgument, match="no next token"):
            forward_topk(tiny, ids, positions, 3, want_token_logprobs=True)
    with pytest.raises(InvalidArgument, match="two tokens"):
        forward_topk(tiny, ids[:, :1], [0], 3, want_token_logprobs=True)


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_seed_models_tiny_shapes_ship_small_and_the_script_remakes_them(tmp_path, tiny_gpt_neo):
    for name, path in TINY_MODELS.items():
        assert sum(p.stat().st_size for p in path.iterdir()) < 1 << 20, name
    config = tiny_gpt_neo.model.config
    assert config.attention_layers == ["global", "local"]
    # The local window is shorter than every prompt the engine contract sends, so each runs past it.
    assert config.window_size < len(tiny_gpt_neo.tokenizer("Hi there").input_ids)
    script = _script()
    assert checkpoint_fingerprint(script.make("gpt-neo", tmp_path / "neo", script.ASSETS / "corpus.txt")) == \
        tiny_gpt_neo.weights_fingerprint
    if HAS_QUANTIZED:
        four = script.make("gpt-neo-4bit", tmp_path / "neo4", script.ASSETS / "corpus.txt")
        assert checkpoint_fingerprint(four) == checkpoint_fingerprint(TINY_MODELS["tiny-gpt-neo-4bit"])


def test_a_bitsandbytes_checkpoint_without_the_quantized_extra_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelNotFound, match=r"bnb-4bit-nf4.*bitsandbytes.* not installed.*\.\[quantized\]"):
        load_model("tiny-gpt-neo-4bit", device="cpu")


def test_the_4bit_checkpoint_loads_as_4bit_weights_and_declares_it(tiny_gpt_neo_4bit):
    from bitsandbytes.nn import Linear4bit

    kinds = {type(m) for m in tiny_gpt_neo_4bit.model.modules()}
    assert Linear4bit in kinds and tiny_gpt_neo_4bit.quantization == "bnb-4bit-nf4"
    assert tiny_gpt_neo_4bit.dtype == torch.float32 and tiny_gpt_neo_4bit.device.type == "cpu"


# bitsandbytes' 8-bit matmul computes in float16 and says so at every call.
@needs_quantized
@pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning")
async def test_an_8bit_checkpoint_loads_on_the_cpu_declares_itself_and_serves_as_generate(tmp_path, tiny_gpt_neo):
    from neuron.config import MinerConfig
    from neuron.engine.hf import HFEngine
    from neuron.engine.types import GenerateJob

    script = _script()  # the tiny GPT-Neo in 8-bit does not ship: made here, as an operator would make one
    lm = load_model(str(script.make("gpt-neo-8bit", tmp_path / "neo8", script.ASSETS / "corpus.txt")), device="cpu")
    assert lm.quantization == "bnb-8bit" and lm.weights_fingerprint != tiny_gpt_neo.weights_fingerprint
    prompt = lm.tokenizer("The capital of France is").input_ids
    ids = torch.tensor([prompt])
    want = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=lm.tokenizer.pad_token_id)[0, len(prompt):].tolist()
    engine = HFEngine(lm, MinerConfig().batching, 128)
    await engine.start()
    try:
        got = [s.token_id async for s in engine.generate(GenerateJob(tuple(prompt), 12))]
    finally:
        await engine.stop(timeout=0)
    assert got == want[:len(got)] and engine.info().quantization == "bnb-8bit"


def test_the_precisions_calibration_found_failing_are_named():
    from neuron.model import precision_problem

    assert precision_problem("tiny", "float32") == "" and precision_problem("tiny", "float16") == ""
    assert precision_problem("tiny", "bfloat16").startswith("bfloat16 answers")
    assert precision_problem("tiny-gpt-neo", "float16").startswith("GPT-Neo in float16")
    assert precision_problem("tiny-gpt-neo", "float32") == ""


def test_auto_serves_gpt_neo_in_float32_on_every_device():
    from neuron.model import auto_dtype

    assert (auto_dtype("opt", on_cuda=True), auto_dtype("opt", on_cuda=False)) == ("float16", "float32")
    assert (auto_dtype("gpt_neo", on_cuda=True), auto_dtype("gpt_neo", on_cuda=False)) == ("float32", "float32")
    assert load_model("tiny-gpt-neo", "cpu", "auto").dtype == torch.float32


async def test_the_miner_refuses_to_serve_a_precision_that_fails_verification():
    """run_miner without the CLI's preflight (the mock network, a harness): the engine's own dtype is checked once
    it starts, the engine is stopped and the port is never bound."""
    import socket

    from conftest import miner_config
    from neuron.miner import run_miner
    from neuron.model import UnverifiablePrecision
    from test_metrics import free_port

    port = free_port()
    config = miner_config(**{"model.name": "tiny-gpt-neo", "model.dtype": "float16", "axon.port": port})
    with pytest.raises(UnverifiablePrecision, match="not serving: GPT-Neo in float16"):
        await asyncio.wait_for(run_miner(config, None, None), 60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # never bound by the miner, so free