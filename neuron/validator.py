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
from neuron.config import ValidatorConfig
from neuron.dataset import PromptSource
from neuron.dendrite import Dendrite, Target
from neuron.model import LoadedModel, load_model
from neuron.reference import Reference


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
                 source: PromptSource | None = None, thresholds: scoring.Thresholds | None = None):
        self.config, self.chain, self.wallet, self.lm = config, chain, wallet, lm
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
            logger.warning("no serving miners on the subnet; nothing to query this round")
            return {}
        targets = [Target(str(mg.by_uid(u).axon), mg.by_uid(u).hotkey) for u in uids]
        challenges = [make_challenge(self.lm, self.source, self.rng, self.challenge_config) for _ in uids]
        timeout = self.config.timeout_s
        forwards = [self.dendrite.call(t, "Forward", c.forward_request(), timeout) for t, c in zip(targets, challenges)]
        generates = [self.dendrite.call(t, "Generate", c.generate_request(), timeout) for t, c in zip(targets, challenges)]
        results = await asyncio.gather(*forwards, *generates)
        fwd, gen = results[: len(uids)], results[len(uids):]
        judgements = await asyncio.to_thread(self._judge_all, challenges, fwd, gen)
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
        logger.info(f"round {s.rounds}: {verified}/{len(uids)} miners verified in {time.monotonic() - started:.2f} s")
        for uid, j in zip(uids, judgements):
            if not j.verified:
                logger.debug(f"uid {uid} not verified: {j.reason}")
        self.last_round = dict(zip(uids, judgements))
        return self.last_round

    def _judge_all(self, challenges: list[Challenge], fwd, gen) -> list[Judgement]:
        return judge_round(self.reference, challenges, fwd, gen, self.thresholds, require_signature=True)

    def _weigh_evidence(self, uid: int, j: Judgement) -> Judgement:
        """Add the round's token margins to the uid's evidence; a uid whose evidence crossed the limit
        fails this round (and every later one, until its hotkey changes) and loses its score."""
        th, key = self.thresholds, str(uid)
        ev = scoring.update_evidence(self.state.evidence.get(key, scoring.Evidence()), j.margins,
                                     th.evidence_drift, th.evidence_limit)
        self.state.evidence[key] = ev
        if not ev.flagged:
            return j
        self.state.scores[uid] = 0.0
        reason = (f"evidence: token margins over {ev.tokens} tokens ({ev.disagreements} not the sampler's choice) "
                  f"crossed the limit {th.evidence_limit:.3g}")
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
            return False
        top = sorted(zip(values, uids), reverse=True)[:5]
        logger.info("set weights: " + ", ".join(f"uid {u}={v:.3f}" for v, u in top))
        return True


async def run_validator(config: ValidatorConfig, chain: Chain, wallet, stop: asyncio.Event | None = None) -> None:
    """Run rounds until SIGTERM/SIGINT, `stop`, or config.rounds rounds."""
    me = wallet.hotkey.ss58_address
    mg = await asyncio.to_thread(chain.metagraph, config.subtensor.netuid)
    if mg.by_hotkey(me) is None:
        raise ChainError(f"validator hotkey {me} is not registered on netuid {config.subtensor.netuid}; "
                         f"register it with: neuron register --netuid {config.subtensor.netuid} ...")
    lm = await asyncio.to_thread(load_model, config.model.name, config.model.device, config.model.dtype)
    validator = Validator(config, chain, wallet, lm)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set() and not (config.rounds and validator.state.rounds >= config.rounds):
            try:
                await validator.run_round()
            except ChainError as exc:
                logger.warning(f"round skipped, the chain is unavailable: {exc}")
            try:
                await asyncio.wait_for(stop.wait(), config.round_interval_s)
            except asyncio.TimeoutError:
                pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await validator.close()
        logger.info("validator stopped; state saved")
