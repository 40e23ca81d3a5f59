"""Every cheat, in one registry: name -> family and builder, read by the cheat miner, the mock network's and
calibration's checks of names, and calibration's runs. A new cheat is one entry here and reaches them all.

Families: a MODEL cheat changes the weights or the logits and then serves honestly (Forward and Generate);
a PROTOCOL cheat overrides the servicer; a GENERATION cheat answers Forward honestly and chooses its generated
tokens another way than the seeded sampler (a sampler policy, a cheaper model, quantized weights). A name with
a number after it (`noise0.1`, `different0.3`, `nudge0.05`) is its family's cheat with that parameter.
Never imported by production code (tests/test_imports.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

from neuron.axon import AxonServicer
from neuron.engine import sampler
from neuron.harness.cheats import models as m
from neuron.harness.cheats import policies as p
from neuron.harness.cheats import servicers as s

MODEL, PROTOCOL, GENERATION = "model", "protocol", "generation"


@dataclass(frozen=True)
class Cheat:
    """One cheat: its family and how to build it."""

    family: str  # MODEL, PROTOCOL or GENERATION
    # MODEL: (lm, seed[, parameter]) -> the cheating LoadedModel; PROTOCOL: the servicer class;
    # GENERATION: (lm[, parameter]) -> (sampler policy, the model that chooses the tokens)
    build: Callable
    teacher_forced: bool = False  # GENERATION: reports exact logprobs from one teacher-forced pass of the real model
    parametric: bool = False  # takes a number after its name (noise0.1); without one, its default
    bare: bool = True  # usable without a number


CHEATS: dict[str, Cheat] = {
    # Model cheats.
    "random": Cheat(MODEL, m.random_logits),
    "random_weights": Cheat(MODEL, m.random_weights),  # the same architecture, random weights
    "different": Cheat(MODEL, m.perturbed, parametric=True),  # weights plus noise: 0.1 of each tensor's std
    "truncated": Cheat(MODEL, m.truncated),
    "quantized": Cheat(MODEL, m.quantized),  # 4-bit weights, served for Forward and Generate
    "quantized_int8": Cheat(MODEL, functools.partial(m.quantized, bits=8)),
    "noise": Cheat(MODEL, m.noisy, parametric=True),  # Gaussian noise on the logits: 0.5 nats
    # Protocol cheats.
    "replay": Cheat(PROTOCOL, s.ReplayServicer),
    "echo": Cheat(PROTOCOL, s.EchoServicer),
    "early_stop": Cheat(PROTOCOL, s.EarlyStopServicer),
    "slow": Cheat(PROTOCOL, s.SlowServicer),
    "dead": Cheat(PROTOCOL, s.DeadServicer),
    "selective": Cheat(PROTOCOL, s.SelectiveServicer),
    "ignore_stop": Cheat(PROTOCOL, s.IgnoreStopServicer),
    # Generation cheats (Forward honest).
    "greedy": Cheat(GENERATION, lambda lm: (p.Greedy(), lm)),
    "cold": Cheat(GENERATION, lambda lm: (p.Temperature(0.2), lm)),
    "hot": Cheat(GENERATION, lambda lm: (p.Temperature(1.5), lm)),
    "least_likely": Cheat(GENERATION, lambda lm: (p.LeastLikely(), lm)),
    "steer": Cheat(GENERATION, lambda lm: (p.Bias(p.steer_target_ids(lm.tokenizer), 6.0), lm)),
    "early_eos": Cheat(GENERATION, lambda lm: (p.EarlyEos(lm.eos_token_id), lm)),
    "sentence_eos": Cheat(GENERATION, lambda lm: (
        p.EarlyEos(lm.eos_token_id, steer=p.Bias(p.sentence_end_ids(lm.tokenizer), 3.0)), lm)),
    "cheap": Cheat(GENERATION, s.cheap, teacher_forced=True),  # half the layers draft, the real model scores
    # Quantized weights choose the tokens and report their own logprobs (all such a miner has).
    "int8": Cheat(GENERATION, lambda lm: (sampler, m.quantized(lm, bits=8))),
    "int4": Cheat(GENERATION, lambda lm: (sampler, m.quantized(lm, bits=4))),
    "ignore_top_p": Cheat(GENERATION, lambda lm: (p.Ignore("top_p"), lm)),
    "ignore_top_k": Cheat(GENERATION, lambda lm: (p.Ignore("top_k"), lm)),
    # Calibration's: steers within `nudgeDELTA` of the sampler's choice (no default: the delta is the cheat).
    "nudge": Cheat(GENERATION, lambda lm, delta: (p.Nudge(delta), lm), parametric=True, bare=False),
}


def names(family: str) -> tuple[str, ...]:
    """The registry's names of one family, in order (those usable without a number)."""
    return tuple(k for k, c in CHEATS.items() if c.family == family and c.bare)


KINDS = tuple(k for k, c in CHEATS.items() if c.bare)  # every name usable as it is


def lookup(name: str) -> tuple[Cheat, tuple[float, ...]]:
    """(the cheat, its parameter if the name gives one); ValueError naming the choices for an unknown name."""
    if name in CHEATS and CHEATS[name].bare:
        return CHEATS[name], ()
    base, number = re.fullmatch(r"(.*?)([0-9.]*)", name).groups()
    if number and base in CHEATS and CHEATS[base].parametric:
        try:
            return CHEATS[base], (float(number),)
        except ValueError:
            pass
    raise ValueError(f"unknown cheat {name!r}: expected one of {', '.join(KINDS)} (or with a number: "
                     f"{', '.join(k + 'X' for k, c in CHEATS.items() if c.parametric)})")


def cheat_model(name: str, lm, seed: int = 4242):
    """`lm` as the model cheat `name` serves it (another family: `lm` itself, honest)."""
    cheat, parameter = lookup(name)
    return cheat.build(lm, seed, *parameter) if cheat.family == MODEL else lm


def generation_cheat(name: str, lm) -> tuple[object, object]:
    """(sampler policy, model that chooses the tokens) of the generation cheat `name`."""
    cheat, parameter = lookup(name)
    if cheat.family != GENERATION:
        raise ValueError(f"{name} is a {cheat.family} cheat, not a generation cheat: expected one of "
                         f"{', '.join(names(GENERATION))}")
    return cheat.build(lm, *parameter)


def servicer_for(name: str):
    """The servicer class of the cheat `name` (the honest one for model cheats)."""
    cheat, parameter = lookup(name)
    if cheat.family == PROTOCOL:
        return cheat.build
    if cheat.family == GENERATION:
        return functools.partial(s.GenerationCheatServicer, choose=lambda lm: cheat.build(lm, *parameter),
                                 teacher_forced=cheat.teacher_forced)
    return AxonServicer
