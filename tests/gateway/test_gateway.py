"""The gateway end to end: the official `openai` client, a real HTTP server, real miners on a real local chain."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import openai
import pytest

from conftest import local_network, stop_miner
from neuron.config import ValidatorConfig, with_overrides
from neuron.gateway.app import Gateway, serve_gateway
from neuron.gateway.keys import KeyLimits, KeyStore
from neuron.harness.cheats import servicer_for
from neuron.validator.loop import Validator


async def _net(tmp_path, lm, kinds: list[str], model_name: str, **gateway):
    chain, vwallet, miners = await local_network(
        tmp_path, lm, [servicer_for(kind) if kind != "honest" else None for kind in kinds])
    keys = tmp_path / "keys.json"
    config = with_overrides(ValidatorConfig(), **{
        # Deadlines for a busy 2-core machine, not for speed: these tests check behaviour.
        "model.name": model_name, "subtensor.netuid": 1, "timeout_s": 60.0, "epoch_rounds": 1,
        "gateway.first_token_timeout_s": 60.0, "gateway.min_streak": 1,  # users after the one round below
        "state_path": str(tmp_path / "state.json"), "max_new_tokens": 8, "gateway.keys_path": str(keys),
        **{f"gateway.{k}": v for k, v in gateway.items()}})
    v = Validator(config, chain, vwallet, lm)
    await v.run_round()
    gw = Gateway(config.gateway, v.pool, lm, model_name, v.verify_users, deadline_s=config.timeout_s, mix=v.mix)
    server, task, port = await serve_gateway(gw, "127.0.0.1", 0)
    key = KeyStore(keys).add("tests", KeyLimits(requests_per_minute=1000, tokens_per_minute=0, max_concurrent=16))
    return v, gw, miners, port, key, (server, task, gw)


async def _down(v, miners, server_task):
    server, task, gw = server_task
    server.should_exit = True
    await task
    await gw.stop()
    await v.close()
    for axon in miners.values():
        await stop_miner(axon)


@contextlib.asynccontextmanager
async def running(tmp_path, lm, kinds: list[str], model_name: str = "tiny", **gateway):
    """(validator, gateway, miners by uid, port, API key, openai client) of a network up for the block."""
    v, gw, miners, port, key, st = await _net(tmp_path, lm, kinds, model_name, **{"verify_fraction": 1.0, **gateway})
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    try:
        yield v, gw, miners, port, key, client
    finally:
        await client.close()
        await _down(v, miners, st)


@pytest.fixture
async def net(tmp_path, tiny):
    async with running(tmp_path, tiny, ["honest", "honest"]) as parts:
        yield parts


async def _judged(gw: Gateway, n: int) -> None:
    for _ in range(400):
        if gw.verified["verified"] + gw.verified["failed"] >= n and gw.queue.empty():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{n} answers were not judged: {gw.verified}")


async def test_completion_stream_and_seed_give_the_same_text_from_two_miners(net):
    v, gw, miners, _, _, client = net
    assert set(gw.pool.standing) == set(miners)  # both verified by the round
    texts = []
    for uid in miners:  # each miner alone in the pool in turn
        gw.pool.set_standing({uid: 1.0})
        r = await client.completions.with_raw_response.create(model="tiny", prompt="The river", max_tokens=12,
                                                              temperature=0.8, top_p=0.9, seed=1234)
        assert r.headers["x-neuron-miner-uid"] == str(uid)
        c = r.parse()
        assert c.object == "text_completion" and c.usage.completion_tokens == len(c.choices[0].text and
                                                                                 c.usage.completion_tokens * [0])
        texts.append(c.choices[0].text)
    assert texts[0] == texts[1] and texts[0]
    stream = await client.completions.create(model="tiny", prompt="The river", max_tokens=12, temperature=0.8,
                                             top_p=0.9, seed=1234, stream=True)
    parts = [c async for c in stream]
    assert "".join(p.choices[0].text for p in parts) == texts[0]
    assert parts[-1].choices[0].finish_reason in ("length", "stop")
    await _judged(gw, 3)
    assert gw.verified == {"verified": 3, "failed": 0, "skipped": 0}


async def test_logprobs_and_stop_strings_are_served_and_verified(net):
    v, gw, miners, _, _, client = net
    c = await client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=10, temperature=0.0,
                                        logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert all(len(t) == 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    full = c.choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 1] or "e"
    s = await client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=10, temperature=0.0, stop=[stop])
    assert stop not in s.choices[0].text and s.choices[0].finish_reason == "stop"
    await _judged(gw, 2)
    assert gw.verified["failed"] == 0


async def test_echo_with_max_tokens_0_gives_the_prompts_logprobs_from_a_miners_forward(net, tiny):
    import torch

    v, gw, *_, client = net
    ids = tiny.tokenizer("The river ran past the old mill").input_ids
    c = await client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].double(), -1)
    want = [float(ref[p, ids[p + 1]]) for p in range(len(ids) - 1)]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    assert all(len(t) == 2 for t in lp.top_logprobs[1:]) and c.usage.completion_tokens == 0
    # the miner was asked the calibrated top-k (16), as challenges ask it: logprobs=2 is no tell, and no
    # near-tie at a top-2 edge can fail an honest miner
    assert {s.topk for s in gw.mix.forward_counts} == {16}
    e = await client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, echo=True, temperature=0)
    assert e.choices[0].text.startswith("Once upon")
    await _judged(gw, 2)  # the Forward answer was judged like a challenge's, and so was the generation
    assert gw.verified == {"verified": 2, "failed": 0, "skipped": 0}


@pytest.mark.parametrize("body, field", [
    ({"temperature": 5}, "temperature"), ({"n": 2}, "n"), ({"prompt": [1, 999999]}, "prompt"),
    ({"max_tokens": 100000}, "max_tokens"), ({"stop": ["x" * 100]}, "stop"), ({"logprobs": 99}, "logprobs"),
    ({"seed": -1}, "seed"), ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"prompt": ""}, "prompt"),
])
async def test_bad_fields_get_400_naming_the_field(net, body, field):
    *_, client = net
    args = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, **body}
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(**args)
    assert e.value.status_code == 400 and field in (e.value.body or {}).get("param", "") + e.value.message


async def test_keys_limits_and_no_miner(net, tmp_path):
    v, gw, miners, port, key, client = net
    base = f"http://127.0.0.1:{port}/v1"
    c = openai.AsyncOpenAI(base_url=base, api_key="nk-unknown", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await c.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    await c.close()
    async with httpx.AsyncClient() as h:  # no key at all (the openai client insists on one)
        r = await h.post(f"{base}/completions", json={"model": "tiny", "prompt": "Hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    slow = KeyStore(tmp_path / "keys.json").add("slow", KeyLimits(requests_per_minute=1))
    c = openai.AsyncOpenAI(base_url=base, api_key=slow, max_retries=0)
    await c.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    with pytest.raises(openai.RateLimitError) as e:
        await c.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    assert int(e.value.response.headers["retry-after"]) >= 1
    await c.close()
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    gw.pool.set_standing({})
    with pytest.raises(openai.InternalServerError) as e:
        await client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert e.value.status_code == 503
    async with httpx.AsyncClient() as h:
        assert (await h.get(f"http://127.0.0.1:{port}/health")).status_code == 503


async def test_metrics_count_requests_tokens_and_verifications(net):
    from prometheus_client import CollectorRegistry

    from neuron.metrics import GatewayMetrics

    v, gw, miners, port, key, client = net
    registry = CollectorRegistry()
    gw.metrics = GatewayMetrics(registry)
    c = await client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="tiny", prompt="Hi", max_tokens=5, n=3)
    await _judged(gw, 1)

    def value(name, **labels):
        return registry.get_sample_value(name, labels) or 0.0

    assert value("neuron_gateway_requests_total", path="/v1/completions", status="200") == 1
    assert value("neuron_gateway_requests_total", path="/v1/completions", status="400") == 1
    assert value("neuron_gateway_tokens_total") == c.usage.completion_tokens
    assert value("neuron_gateway_key_tokens_total", key=gw.keys.lookup(key).key_id) == c.usage.completion_tokens
    assert value("neuron_gateway_verifications_total", result="verified") == 1
    assert value("neuron_gateway_time_to_first_token_seconds_count") == 1


async def test_a_dead_miner_fails_over_before_the_first_token(net):
    v, gw, miners, _, _, client = net
    dead, alive = list(miners)
    await stop_miner(miners[dead])
    gw.pool.set_standing({dead: 1000.0, alive: 0.001})  # the dead one is nearly always drawn first
    for _ in range(3):
        r = await client.completions.with_raw_response.create(model="tiny", prompt="Hi", max_tokens=4)
        assert r.headers["x-neuron-miner-uid"] == str(alive)
    assert dead not in gw.pool.standing  # out of user traffic until a round verifies it again


async def test_a_client_that_disconnects_cancels_the_miners_stream(net):
    v, gw, miners, port, key, _ = net
    before = {u: a.engine.stats().cancelled for u, a in miners.items()}
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 200, "temperature": 0.7, "stream": True}
    async with httpx.AsyncClient(timeout=30) as h:
        async with h.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # one token, then the client goes away
    for _ in range(200):
        if any(a.engine.stats().cancelled > before[u] for u, a in miners.items()):
            break
        await asyncio.sleep(0.05)
    assert any(a.engine.stats().cancelled > before[u] for u, a in miners.items())
    assert gw.served and not gw.pool.in_flight


async def test_a_cheat_on_user_traffic_is_caught_and_loses_its_users(tmp_path, tiny):
    # 'greedy' answers sampled requests with greedy tokens; the round may not see it (a greedy challenge),
    # user traffic at temperature 1 does.
    async with running(tmp_path, tiny, ["honest", "greedy"]) as (v, gw, miners, _, _, client):
        honest, cheat = sorted(miners)
        gw.pool.set_standing({u: 1.0 for u in miners})
        for i in range(6):
            await client.completions.create(model="tiny", prompt=f"Story {i}:", max_tokens=12, temperature=1.0)
        await _judged(gw, 6)
        assert gw.verified["failed"] >= 1
        assert cheat not in gw.pool.standing and v.state.stats[str(cheat)].users_failed >= 1
        assert v.state.stats[str(honest)].users_failed == 0
        for _ in range(3):  # only the honest miner serves now
            r = await client.completions.with_raw_response.create(model="tiny", prompt="Hi", max_tokens=4)
            assert r.headers["x-neuron-miner-uid"] == str(honest)


async def test_a_miner_that_ignores_stop_strings_is_caught_on_user_traffic(tmp_path, tiny):
    async with running(tmp_path, tiny, ["ignore_stop"]) as (v, gw, miners, _, _, client):
        (uid,) = miners
        gw.pool.set_standing({uid: 1.0})
        full = (await client.completions.create(model="tiny", prompt=[9, 8, 7], max_tokens=12, temperature=0)).choices[0].text
        stop = full[len(full) // 2]
        await client.completions.create(model="tiny", prompt=[9, 8, 7], max_tokens=12, temperature=0, stop=[stop])
        await _judged(gw, 2)
        assert gw.verified == {"verified": 1, "failed": 1, "skipped": 0} and uid not in gw.pool.standing


async def test_chat_on_smollm2(tmp_path, smollm2):
    async with running(tmp_path, smollm2, ["honest"], "smollm2") as (v, gw, miners, _, _, client):
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        c = await client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, seed=7, logprobs=True,
                                                 top_logprobs=2)
        assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
        assert c.choices[0].message.content and len(c.choices[0].logprobs.content) == c.usage.completion_tokens
        stream = await client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, seed=7,
                                                      stream=True)
        text = "".join([p.choices[0].delta.content or "" async for p in stream if p.choices])
        assert text == c.choices[0].message.content
        await _judged(gw, 2)
        assert gw.verified["failed"] == 0


async def test_the_mock_networks_simulated_users_are_answered_and_counted(net):
    from neuron.harness.users import Users, percentile

    v, gw, miners, port, key, _ = net
    users = Users(f"http://127.0.0.1:{port}/v1", "tiny", 2, lambda rng: rng.choice([4, 8]), api_key=key)
    stop = asyncio.Event()
    task = asyncio.create_task(users.run(stop))
    await asyncio.sleep(1.0)
    stop.set()
    await task
    s = users.summary()
    assert s["requests"] >= 2 and s["ok"] == s["requests"] and not s["errors"], s
    assert s["tokens"] == sum(gw.served.values()) and 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"]
    assert {x.uid for x in users.sent} <= set(miners) and users.tokens_since(-1, 0.0) == 0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0


async def test_an_idle_connection_outlives_the_clients_own_keep_alive(net):
    # httpx and the openai client keep an idle connection 5 s: had the gateway closed it at the same moment, a
    # request sent on it would fail (seen in `neuron bench --only gateway`: httpcore.ReadError).
    port = net[3]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for wait in (0.0, 6.0):
            await asyncio.sleep(wait)
            writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
    finally:
        writer.close()
