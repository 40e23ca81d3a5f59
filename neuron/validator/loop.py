"""The validator: each round, challenge miners, judge their answers against the local model, score, set weights."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import secrets
import threading
import time
from pathlib import Path

import torch
from loguru import logger

from neuron import scoring
from neuron.chain.base import Chain, ChainError, Metagraph
from neuron.config import ValidatorConfig, WalletConfig
from neuron.dataset import PromptSource
from neuron.dendrite import Dendrite, Target
from neuron.logs import clip
from neuron.model import LoadedModel, load_model
from neuron.protocol import ForwardAnswer, GenerateAnswer
from neuron.signals import until_signalled
from neuron.validator.challenge import Challenge, ChallengeConfig, make_challenge
from neuron.validator.challenge import FwdCheck, GenCheck
from neuron.validator.declared import Declarations, Declared
from neuron.validator.judge import Judgement, Outcome, judge_round, judge_users
from neuron.validator.mix import TrafficMix
from neuron.validator.pool import MinerPool
from neuron.validator.reference import Reference
from neuron.validator.state import State, UidStats


class Validator:
    """Holds the model, the dendrite, the moving averages; `run_round` is one full round."""

    def __init__(self, config: ValidatorConfig, chain: Chain, wallet, lm: LoadedModel,
                 source: PromptSource | None = None, thresholds: scoring.Thresholds | None = None, metrics=None):
        self.config, self.chain, self.wallet, self.lm = config, chain, wallet, lm
        self.metrics = metrics  # a neuron.metrics.ValidatorMetrics, or None
        self.keypair = wallet.hotkey
        self.source = source or (PromptSource.from_file(config.dataset) if config.dataset else PromptSource.default())
        self.thresholds = thresholds or scoring.Thresholds()
        self.challenge_config = ChallengeConfig(seq_len=config.forward_seq_len, positions=config.forward_positions,
                                                topk=config.topk, max_new_tokens=config.max_new_tokens)
        self.reference = Reference(lm)
        self.dendrite = Dendrite(self.keypair)
        self.pool = MinerPool(chain, config.subtensor.netuid, self.dendrite, self.keypair.ss58_address)
        self.declarations = Declarations(Declared.of_model(lm))
        # The reference model is used by the rounds and by user verification, each on a worker thread.
        self._model_lock = threading.Lock()
        self.state_path = Path(os.path.expanduser(config.state_path))
        self.state = State.load(self.state_path)
        self.mix = TrafficMix.from_json(self.state.mix, TrafficMix.default(config.max_new_tokens))
        if self.state.rounds:
            logger.info(f"resumed validator state after round {self.state.rounds} from {self.state_path}")
        self.rng = random.Random(secrets.randbits(64))
        self.last_round: dict[int, Judgement] = {}
        self.last_judge_s = 0.0  # the validator's own work in the last round: reference and checks

    async def close(self) -> None:
        await self.dendrite.close()

    def _sync(self, mg: Metagraph) -> None:
        """Grow the score table to the subnet; zero a uid whose hotkey changed (a new miner)."""
        n = max((x.uid for x in mg.neurons), default=-1) + 1
        s = self.state
        s.scores += [0.0] * (n - len(s.scores))
        s.hotkeys += [""] * (n - len(s.hotkeys))
        changed = [x.uid for x in mg.neurons if s.hotkeys[x.uid] != x.hotkey]
        if changed:
            scores = scoring.reset_uids(torch.tensor(s.scores), torch.tensor(changed))
            s.scores = scores.tolist()
            for uid in changed:
                s.hotkeys[uid] = mg.by_uid(uid).hotkey
                s.stats[str(uid)] = UidStats(hotkey=s.hotkeys[uid])
                s.evidence.pop(str(uid), None)

    def _pick(self, mg: Metagraph) -> list[int]:
        """The next uids of a permutation of all serving miners, so every uid is queried in turn."""
        me = self.keypair.ss58_address
        serving = {x.uid for x in mg.neurons if x.axon is not None and x.hotkey != me}
        picked: list[int] = []
        while len(picked) < min(self.config.sample_size, len(serving)):
            if not self.state.queue:
                order = sorted(serving)
                self.rng.shuffle(order)
                self.state.queue = order
            uid = self.state.queue.pop(0)
            if uid in serving and uid not in picked:
                picked.append(uid)
        return picked

    async def run_round(self) -> dict[int, Judgement]:
        """Query, judge, score and (every epoch) set weights; returns each queried uid's judgement."""
        started = time.monotonic()
        mg = await self.pool.metagraph(fresh=True)
        self._sync(mg)
        uids = self._pick(mg)
        if not uids:
            logger.warning(f"no miner on netuid {self.config.subtensor.netuid} serves an axon; nothing to query "
                           "this round")
            return {}
        targets = [Target(str(mg.by_uid(u).axon), mg.by_uid(u).hotkey) for u in uids]
        taken: set[str] = set()  # no two miners get the same prompt in a round
        challenges = [make_challenge(self.lm, self.source, self.rng, self.challenge_config, self.mix, taken)
                      for _ in uids]
        timeout = self.config.timeout_s
        forwards = [self.dendrite.call(t, "Forward", c.forward_request(), timeout) for t, c in zip(targets, challenges)]
        # Streamed, as the gateway asks users' generations: the RPC is no tell either.
        generates = [self.dendrite.stream_all(t, c.generate_request(), timeout) for t, c in zip(targets, challenges)]
        # A miner met for the first time is asked its declaration now; later asks come from `watch_declarations`.
        first_met = [t for t in targets if self.declarations.unknown(t)]
        results, _ = await asyncio.gather(asyncio.gather(*forwards, *generates),
                                          self.declarations.refresh(self.dendrite, first_met, min(timeout, 5.0)))
        fwd, gen = results[: len(uids)], results[len(uids):]
        # A miner is judged only against the model it declares: its answers to this one are no evidence either
        # way, and are not judged (no reference work for them).
        other = [self.declarations.problem(t) for t in targets]
        mine = [i for i, problem in enumerate(other) if not problem]
        judging = time.monotonic()
        judged = iter(await asyncio.to_thread(self._judge_all, [challenges[i] for i in mine], [fwd[i] for i in mine],
                                              [gen[i] for i in mine]))
        self.last_judge_s = time.monotonic() - judging
        judgements = [Judgement(False, problem, latency_s=max(f.latency_s, g.latency_s), outcome=Outcome.OTHER_MODEL)
                      if problem else next(judged) for problem, f, g in zip(other, fwd, gen)]
        judgements = [self._weigh_evidence(uid, j) for uid, j in zip(uids, judgements)]
        s = self.state
        stats = [s.stats.setdefault(str(uid), UidStats(hotkey=s.hotkeys[uid])) for uid in uids]
        for st, j, g in zip(stats, judgements, gen):
            if j.verified:
                st.add_speed("challenge", g.latency_s / max(1.0, j.metrics.get("n_tokens", 1.0)))
        # Speed counts the worse of the challenge and user medians: a miner slower per token for users than
        # for challenges has its challenge latency stretched by that much.
        rewards = torch.tensor([scoring.reward(j.verified, j.loss, j.latency_s * st.slowdown(), timeout, j.ref_loss)
                                for j, st in zip(judgements, stats)])
        s.scores = scoring.ema_update(torch.tensor(s.scores), torch.tensor(uids), rewards, self.config.alpha).tolist()
        for st, j in zip(stats, judgements):
            st.record(j)
        s.rounds += 1
        s.mix = self.mix.to_json()
        self.pool.set_standing(self.standing())
        if s.rounds % self.config.epoch_rounds == 0:
            await self.set_weights(mg)
        s.save(self.state_path)
        verified = sum(j.verified for j in judgements)
        elapsed = time.monotonic() - started
        logger.info(f"round {s.rounds}: {verified}/{len(uids)} miners verified in {elapsed:.2f} s "
                    f"(judging {self.last_judge_s:.2f} s)")
        for uid, j in zip(uids, judgements):
            if not j.verified:  # an operator sees why in the INFO log: dead, refused, or wrong
                logger.info(f"round {s.rounds}: uid {uid} {mg.by_uid(uid).hotkey} {j.outcome.value}: {j.reason}")
        if self.metrics is not None:
            self.metrics.rounds.inc()
            self.metrics.round_seconds.observe(elapsed)
            for uid, j in zip(uids, judgements):
                self.metrics.observe_judgement(uid, j.verified, j.reason)
            for uid, score in enumerate(s.scores):
                self.metrics.score.labels(str(uid)).set(score)
        self.last_round = dict(zip(uids, judgements))
        return self.last_round

    async def watch_declarations(self, stop: asyncio.Event) -> None:
        """Ask the serving miners' declarations again at random times, out of step with the rounds, until `stop`."""
        async def targets() -> list[Target]:
            mg, me = await self.pool.metagraph(), self.keypair.ss58_address
            return [Target(str(x.axon), x.hotkey) for x in mg.neurons if x.axon is not None and x.hotkey != me]

        await self.declarations.watch(self.dendrite, targets, stop, min(self.config.timeout_s, 5.0))

    def _judge_all(self, challenges: list[Challenge], fwd, gen) -> list[Judgement]:
        with self._model_lock:
            return judge_round(self.reference, challenges, fwd, gen, self.thresholds, require_signature=True)

    def standing(self) -> dict[int, float]:
        """The miners that may serve users: scored, unflagged, verified in their last --gateway.min_streak checks
        in a row, and, after a wrong answer, in --gateway.min_clean checks since (a cheat that passes a round now
        and then does not win users back; an honest miner that timed out does, soon)."""
        s, gc, out = self.state, self.config.gateway, {}
        for uid, score in enumerate(s.scores):
            st, ev = s.stats.get(str(uid)), s.evidence.get(str(uid))
            if (score > 0 and st is not None and st.streak >= gc.min_streak and (st.clean < 0 or st.clean >= gc.min_clean)
                    and not (ev and ev.flagged)):
                out[uid] = score
        return out

    async def verify_users(self, items: list[tuple[int, str, GenCheck | FwdCheck, GenerateAnswer | ForwardAnswer,
                                                   float]]) -> list[Judgement]:
        """Judge user answers (uid, hotkey, what was asked, the answer, seconds) by the challenges' checks and
        evidence; a failure costs the miner what a failed challenge costs, and takes it out of user traffic.
        Answers from a uid whose hotkey changed since are dropped (their verdict belongs to another miner)."""
        s = self.state
        items = [it for it in items if it[0] < len(s.hotkeys) and s.hotkeys[it[0]] == it[1]]
        if not items:
            return []

        def judge():
            with self._model_lock:
                return judge_users(self.reference, [c for _, _, c, _, _ in items], [a for _, _, _, a, _ in items],
                                         [t for *_, t in items], self.thresholds)

        judgements = await asyncio.to_thread(judge)
        out = []
        for (uid, _, _, answer, seconds), j in zip(items, judgements):
            j = self._weigh_evidence(uid, j)
            st = s.stats.setdefault(str(uid), UidStats(hotkey=s.hotkeys[uid]))
            st.record(j, user=True)
            if j.verified and isinstance(answer, GenerateAnswer):
                st.add_speed("user", seconds / max(1, len(answer.token_ids)))
            else:
                s.scores = scoring.ema_update(torch.tensor(s.scores), torch.tensor([uid]), torch.tensor([0.0]),
                                              self.config.alpha).tolist()
                self.pool.revoke(uid)
                logger.info(f"user answer of uid {uid} {s.hotkeys[uid]} failed verification: {j.reason}")
            if self.metrics is not None:
                self.metrics.observe_judgement(uid, j.verified, j.reason)
            out.append(j)
        return out

    def _weigh_evidence(self, uid: int, j: Judgement) -> Judgement:
        """Add the round's token margins and logprob errors to the uid's evidence; a uid whose evidence
        crossed a limit fails this round (and every later one, until its hotkey changes) and loses its score."""
        th, key = self.thresholds, str(uid)
        ev = scoring.update_evidence(self.state.evidence.get(key, scoring.Evidence()), j.margins, j.errors, th)
        self.state.evidence[key] = ev
        if not ev.flagged:
            return j
        self.state.scores[uid] = 0.0
        n = max(ev.tokens, 1)
        reason = (f"evidence: {ev.flagged_by} crossed the limit over {ev.tokens} tokens ({ev.disagreements} not "
                  f"the sampler's choice, mean logprob error {ev.error_sum / n:.4f})")
        return dataclasses.replace(j, verified=False, reason=j.reason or reason, outcome=j.outcome if not j.verified else Outcome.WRONG)

    def weights(self) -> torch.Tensor:
        return scoring.weights_from_scores(torch.tensor(self.state.scores), self.config.max_weight)

    async def set_weights(self, mg: Metagraph) -> bool:
        """Set normalised, capped weights; a chain refusal is logged and retried next epoch."""
        w = self.weights()
        uids = [x.uid for x in mg.neurons if x.uid < len(w)]
        values = [float(w[u]) for u in uids]
        if sum(values) <= 0:
            logger.info("no miner has a score yet; not setting weights")
            return False
        try:
            await asyncio.to_thread(self.chain.set_weights, self.config.subtensor.netuid, self.wallet, uids, values)
        except ChainError as exc:
            logger.warning(f"setting weights failed, will retry next epoch: {exc}")
            if self.metrics is not None:
                self.metrics.weight_sets.labels("failed").inc()
            return False
        if self.metrics is not None:
            self.metrics.weight_sets.labels("ok").inc()
            for u, v in zip(uids, values):
                self.metrics.weight.labels(str(u)).set(v)
        top = sorted(zip(values, uids), reverse=True)[:5]
        logger.info("set weights: " + ", ".join(f"uid {u}={v:.3f}" for v, u in top))
        return True


def startup_report(config: ValidatorConfig, mg: Metagraph, me: str) -> None:
    """Name, before any round, what will make rounds fail: no permit of our own, miners that serve nothing."""
    netuid, mine = config.subtensor.netuid, mg.by_hotkey(me)
    if not mine.validator_permit:
        w = config.wallet
        logger.warning(f"uid {mine.uid} ({me}) has no validator permit on netuid {netuid} (stake {mine.stake:g}): "
                       f"miners refuse validators without one. Add stake: neuron stake add --amount 10 --netuid "
                       f"{netuid} --wallet.name {w.name} --wallet.hotkey {w.hotkey} "
                       + (f"--subtensor.chain_endpoint {config.subtensor.chain_endpoint}" if config.subtensor.chain_endpoint
                          else f"--subtensor.network {config.subtensor.network}")
                       + (f" --wallet.path {w.path}" if w.path != WalletConfig().path else "")
                       + (f" --subtensor.chain_path {config.subtensor.chain_path}" if config.subtensor.chain_path else ""))
    others = [n for n in mg.neurons if n.hotkey != me]
    silent = [n for n in others if n.axon is None]
    for n in silent[:10]:
        logger.info(f"uid {n.uid} {n.hotkey} serves no axon yet; it is not queried")
    if len(silent) > 10:
        logger.info(f"... and {len(silent) - 10} more uids serve no axon (neuron metagraph lists them)")
    logger.info(f"netuid {netuid}: {len(others) - len(silent)} of {len(others)} other uids serve an axon")


async def probe_miners(dendrite: Dendrite, mg: Metagraph, me: str, timeout_s: float) -> None:
    """Name, at start-up, each serving miner that does not answer `Info` (public: no model work, no permit)."""
    from neuron.pb.neuron.v1 import axon_pb2 as pb

    serving = [n for n in mg.neurons if n.axon is not None and n.hotkey != me]
    # No hotkey in the target: Info answers are not signed, so there is no signature to check.
    results = await asyncio.gather(*(dendrite.call(Target(str(n.axon)), "Info", pb.InfoRequest(), timeout_s)
                                     for n in serving))
    for n, r in zip(serving, results):
        if not r.ok:
            logger.warning(f"uid {n.uid} {n.hotkey} at {n.axon} is unreachable: {r.code.name.lower()}: {clip(r.message, 120)}")
        elif r.response.hotkey != n.hotkey:  # another miner on that address: its answers will not verify
            logger.warning(f"uid {n.uid} {n.hotkey} at {n.axon}: the axon there answers as hotkey "
                           f"{r.response.hotkey or '(none)'}")
    if serving:
        logger.info(f"{sum(r.ok for r in results)} of {len(serving)} serving miners answer")


async def run_validator(config: ValidatorConfig, chain: Chain, wallet, stop: asyncio.Event | None = None,
                        metrics=None) -> int:
    """Run rounds (and the gateway, with --gateway.port) until SIGTERM/SIGINT, `stop`, or config.rounds rounds
    of this process. Returns how many rounds queried at least one miner.
    """
    stop = stop or asyncio.Event()
    with until_signalled(stop):
        me = wallet.hotkey.ss58_address
        mg = await asyncio.to_thread(chain.metagraph, config.subtensor.netuid)
        if mg.by_hotkey(me) is None:
            raise ChainError(f"validator hotkey {me} is not registered on netuid {config.subtensor.netuid}; "
                             f"register it with: neuron register --netuid {config.subtensor.netuid} ...")
        startup_report(config, mg, me)
        lm = await asyncio.to_thread(load_model, config.model.name, config.model.device, config.model.dtype)
        validator = Validator(config, chain, wallet, lm, metrics=metrics)
        gateway = None
        declarations = asyncio.create_task(validator.watch_declarations(stop))
        try:
            await probe_miners(validator.dendrite, mg, me, min(config.timeout_s, 5.0))
            if config.gateway.port:
                gateway = await start_gateway(validator, metrics)
            return await _rounds(validator, config, stop)
        finally:
            declarations.cancel()
            await asyncio.gather(declarations, return_exceptions=True)
            if gateway is not None:
                server, task, gw = gateway
                server.should_exit = True
                await task
                await gw.stop()
            await validator.close()


async def start_gateway(validator: Validator, metrics=None):
    """The gateway over the validator's pool, on --gateway.ip/port; returns (uvicorn server, task, Gateway)."""
    from neuron.gateway.app import Gateway, serve_gateway
    from neuron.miner import is_public

    gc = validator.config.gateway
    if not gc.auth:
        where = "reachable from other machines: anyone can use it" if is_public(gc.ip) else "loopback only"
        (logger.warning if is_public(gc.ip) else logger.info)(
            f"gateway auth is off (--gateway.auth false) on {gc.ip} ({where}); development only")
    gm = None
    if metrics is not None:
        from neuron.metrics import GatewayMetrics

        gm = GatewayMetrics(metrics.registry)
    gw = Gateway(gc, validator.pool, validator.lm, validator.config.model.name, validator.verify_users,
                 deadline_s=validator.config.timeout_s, mix=validator.mix, metrics=gm)
    server, task, port = await serve_gateway(gw, gc.ip, gc.port)
    logger.info(f"gateway: OpenAI-compatible API at http://{gc.ip}:{port}/v1 (model {gw.model_name!r}), "
                f"{gc.verify_fraction:.0%} of user answers verified; users are served once a round verified a miner")
    return server, task, gw


async def _rounds(validator: Validator, config: ValidatorConfig, stop: asyncio.Event) -> int:
    ran = queried = 0  # rounds of this process: --rounds counts these, not the saved total
    try:
        while not stop.is_set() and not (config.rounds and ran >= config.rounds):
            ran += 1
            try:
                queried += bool(await validator.run_round())
            except ChainError as exc:
                logger.warning(f"round skipped, the chain is unavailable: {exc}")
            if config.rounds and ran >= config.rounds:
                break
            try:
                await asyncio.wait_for(stop.wait(), config.round_interval_s)
            except asyncio.TimeoutError:
                pass
    finally:
        logger.info(f"validator stopped after {ran} rounds of this process ({queried} with miners to query); "
                    "state saved")
    return queried
