"""Model cheats: a copy of the model with other weights or rewritten logits, then served "honestly"."""

from __future__ import annotations

import copy
import dataclasses

import torch

from neuron.model import LoadedModel


class LogitsFilter(torch.nn.Module):
    """Wraps a causal LM and rewrites its logits: the worker and decoder use it like the real model."""

    def __init__(self, model: torch.nn.Module, rewrite):
        super().__init__()
        self.inner, self.rewrite = model, rewrite
        self.config = model.config

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.logits = self.rewrite(out.logits)
        return out


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers: OPT's model.decoder.layers, Llama's model.layers, GPT-Neo's transformer.h."""
    if hasattr(model, "transformer"):
        return model.transformer.h
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def quantize_(model: torch.nn.Module, bits: int) -> None:
    """Round every Linear weight to `bits` per output row (symmetric, absmax scale; what a cheap miner does to save
    memory); in an already quantized model (bitsandbytes), the Linear weights it left in floating point."""
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.is_floating_point():
                scale = m.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / levels
                m.weight.copy_((m.weight / scale).round().clamp(-levels, levels) * scale)


def _with_model(lm: LoadedModel, model: torch.nn.Module) -> LoadedModel:
    return dataclasses.replace(lm, model=model)


def random_logits(lm: LoadedModel, seed: int) -> LoadedModel:
    """Standard normal logits, nothing computed."""
    gen = torch.Generator().manual_seed(seed)
    return _with_model(lm, LogitsFilter(lm.model, lambda x: torch.randn(x.shape, generator=gen).to(x)))


def noisy(lm: LoadedModel, seed: int, std: float = 0.5) -> LoadedModel:
    """Honest logits plus Gaussian noise of `std` (in logit units, i.e. nats)."""
    gen = torch.Generator().manual_seed(seed)
    return _with_model(lm, LogitsFilter(lm.model, lambda x: x + std * torch.randn(x.shape, generator=gen).to(x)))


def random_weights(lm: LoadedModel, seed: int) -> LoadedModel:
    """The same architecture with random weights (each tensor's std kept); a bitsandbytes model's packed weights
    stay: the rest is random."""
    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * p.std().nan_to_num(0.02))
    return _with_model(lm, model)


def perturbed(lm: LoadedModel, seed: int, relative: float = 0.1) -> LoadedModel:
    """Another model of the same architecture, close to the real one: every floating-point weight plus noise of
    `relative` x its tensor's std."""
    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                scale = float(p.float().std()) if p.numel() > 1 else 0.0
                p.add_(torch.randn(p.shape, generator=gen).to(p) * relative * scale)
    return _with_model(lm, model)


def truncated(lm: LoadedModel, seed: int = 0, keep: float = 0.5) -> LoadedModel:
    """The real model cut to its first `keep` of layers (a cheaper model)."""
    model = copy.deepcopy(lm.model)
    layers = _layers(model)
    del layers[max(1, int(len(layers) * keep)):]
    model.config.num_hidden_layers = len(layers)
    return _with_model(lm, model)


def quantized(lm: LoadedModel, seed: int = 0, bits: int = 4) -> LoadedModel:
    """The real model with every Linear weight rounded to `bits` (int8, 4-bit) and dequantized."""
    model = copy.deepcopy(lm.model)
    quantize_(model, bits)
    return _with_model(lm, model)
