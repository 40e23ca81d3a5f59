"""The validator: each round, challenge miners, judge their answers against the local model, score, set weights."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger

from neuron import scoring
from neuron.chain.base import Chain, ChainError, Metagraph
from neuron.challenge import Challenge, ChallengeConfig, Judgement, judge_round, make_challenge
from neuron.config import ValidatorConfig, WalletConfig
from neuron.dataset import PromptSource
from neuron.dendrite import Dendrite, Target
from neuron.model import LoadedModel, load_model
from neuron.reference import Reference


def failure_kind(reason: str) -> str:
    """What an operator does about a failure: a miner that refused us, one we could not reach, or a wrong answer."""
    call = reason.split(": ")[1] if reason.count(": ") >= 1 else ""
    if call in ("permission_denied", "unauthenticated", "resource_exhausted"):
        return "refused"
    if call in ("unavailable", "deadline_exceeded", "cancelled"):
        return "unreachable"
    return "wrong answer"


@dataclass
class UidStats:
    """What the validator saw of one uid, for operators and the mock network's report."""

    hotkey: str = ""
    queried: int = 0
    verified: int = 0
    last_reason: str = ""
    reasons: dict[str, int] = field(default_factory=dict)  # failure kind -> count

    def record(self, j: Judgement) -> None:
        self.queried += 1
        self.verified += j.verified
        self.last_reason = j.reason
        if not j.verified:
            kind = re.split(r"\s-?\d", j.reason)[0][:100]  # numbers vary; the kind of failure does not
            self.reasons[kind] = self.reasons.get(kind, 0) + 1


@dataclass
class State:
    """Everything that must survive a restart; saved atomically as JSON (never pickle)."""

    scores: list[float] = field(default_factory=list)
    hotkeys: list[str] = field(default_factory=list)  # hotkey each score belongs to
    rounds: int = 0
    queue: list[int] = field(default_factory=list)  # uids still to query in this permutation
    stats: dict[str, UidStats] = field(default_factory=dict)
    evidence: dict[str, scoring.Evidence] = field(default_factory=dict)  # uid -> generation evidence (CUSUM)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        data = {"scores": self.scores, "hotkeys": self.hotkeys, "rounds": self.rounds, "queue": self.queue,
                "stats": {k: v.__dict__ for k, v in self.stats.items()},
                "evidence": {k: dataclasses.asdict(v) for k, v in self.evidence.items()}}
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "State":
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(scores=[float(x) for x in data["scores"]], hotkeys=[str(h) for h in data["hotkeys"]],
                       rounds=int(data["rounds"]), queue=[int(u) for u in data["queue"]],
                       stats={k: UidStats(**v) for k, v in data.get("stats", {}).items()},
                       evidence={k: scoring.Evidence(**v) for k, v in data.get("evidence", {}).items()})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"validator state {path} is unreadable ({exc}); move it away to start afresh") from None


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
        self.state_path = Path(os.path.expanduser(config.state_path))
        self.state = State.load(self.state_path)
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
        mg = await asyncio.to_thread(self.chain.metagraph, self.config.subtensor.netuid)
        self._sync(mg)
        uids = self._pick(mg)
        if not uids:
            logger.warning(f"no miner on netuid {self.config.subtensor.netuid} serves an axon; nothing to query "
                           "this round")
            return {}
        targets = [Target(str(mg.by_uid(u).axon), mg.by_uid(u).hotkey) for u in uids]
        challenges = [make_challenge(self.lm, self.source, self.rng, self.challenge_config) for _ in uids]
        timeout = self.config.timeout_s
        forwards = [self.dendrite.call(t, "Forward", c.forward_request(), timeout) for t, c in zip(targets, challenges)]
        generates = [self.dendrite.call(t, "Generate", c.generate_request(), timeout) for t, c in zip(targets, challenges)]
        results = await asyncio.gather(*forwards, *generates)
        fwd, gen = results[: len(uids)], results[len(uids):]
        judging = time.monotonic()
        judgements = await asyncio.to_thread(self._judge_all, challenges, fwd, gen)
        self.last_judge_s = time.monotonic() - judging
        judgements = [self._weigh_evidence(uid, j) for uid, j in zip(uids, judgements)]
        rewards = torch.tensor([scoring.reward(j.verified, j.loss, j.latency_s, timeout, j.ref_loss) for j in judgements])
        s = self.state
        s.scores = scoring.ema_update(torch.tensor(s.scores), torch.tensor(uids), rewards, self.config.alpha).tolist()
        for uid, j in zip(uids, judgements):
            s.stats.setdefault(str(uid), UidStats(hotkey=s.hotkeys[uid])).record(j)
        s.rounds += 1
        if s.rounds % self.config.epoch_rounds == 0:
            await self.set_weights(mg)
        s.save(self.state_path)
        verified = sum(j.verified for j in judgements)
        elapsed = time.monotonic() - started
        logger.info(f"round {s.rounds}: {verified}/{len(uids)} miners verified in {elapsed:.2f} s "
                    f"(judging {self.last_judge_s:.2f} s)")
        for uid, j in zip(uids, judgements):
            if not j.verified:  # an operator sees why in the INFO log: dead, refused, or wrong
                logger.info(f"round {s.rounds}: uid {uid} {mg.by_uid(uid).hotkey} {failure_kind(j.reason)}: {j.reason}")
        if self.metrics is not None:
            self.metrics.rounds.inc()
            self.metrics.round_seconds.observe(elapsed)
            for uid, j in zip(uids, judgements):
                self.metrics.observe_judgement(uid, j.verified, j.reason)
            for uid, score in enumerate(s.scores):
                self.metrics.score.labels(str(uid)).set(score)
        self.last_round = dict(zip(uids, judgements))
        return self.last_round

    def _judge_all(self, challenges: list[Challenge], fwd, gen) -> list[Judgement]:
        return judge_round(self.reference, challenges, fwd, gen, self.thresholds, require_signature=True)

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
        return dataclasses.replace(j, verified=False, reason=j.reason or reason)

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
            logger.warning(f"uid {n.uid} {n.hotkey} at {n.axon} is unreachable: {r.code.name.lower()}: {r.message[:120]}")
        elif r.response.hotkey != n.hotkey:  # another miner on that address: its answers will not verify
            logger.warning(f"uid {n.uid} {n.hotkey} at {n.axon}: the axon there answers as hotkey "
                           f"{r.response.hotkey or '(none)'}")
    if serving:
        logger.info(f"{sum(r.ok for r in results)} of {len(serving)} serving miners answer")


async def run_validator(config: ValidatorConfig, chain: Chain, wallet, stop: asyncio.Event | None = None,
                        metrics=None) -> int:
    """Run rounds until SIGTERM/SIGINT, `stop`, or config.rounds rounds of this process.

    Returns how many rounds queried at least one miner.
    """
    me = wallet.hotkey.ss58_address
    mg = await asyncio.to_thread(chain.metagraph, config.subtensor.netuid)
    if mg.by_hotkey(me) is None:
        raise ChainError(f"validator hotkey {me} is not registered on netuid {config.subtensor.netuid}; "
                         f"register it with: neuron register --netuid {config.subtensor.netuid} ...")
    startup_report(config, mg, me)
    lm = await asyncio.to_thread(load_model, config.model.name, config.model.device, config.model.dtype)
    validator = Validator(config, chain, wallet, lm, metrics=metrics)
    await probe_miners(validator.dendrite, mg, me, min(config.timeout_s, 5.0))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await validator.close()
        logger.info(f"validator stopped after {ran} rounds of this process ({queried} with miners to query); "
                    "state saved")
    return queried
