"""CUDA graphs of the decode step: one per bucket size, captured on first use, checked against eager once.

A decode step of a small model on a GPU is mostly kernel-launch and Python time; replaying a captured
graph removes both. Everything the step reads lives at fixed addresses in the runner (last tokens,
positions, the write column, the KV buffers), and a graph attends over the whole buffer width so its
shapes never change. A capture that fails, or whose replay differs from the eager step, turns graphs
off for good with one warning: eager decoding is always the fallback.
"""

from __future__ import annotations

import torch
from loguru import logger


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        self.graphs: dict[int, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.off = False

    def logits(self, b: int) -> torch.Tensor | None:
        """The step's logits [b, 1, V] by replay, or None: the caller runs the step eagerly."""
        if self.off:
            return None
        entry = self.graphs.get(b)
        if entry is None:
            try:
                entry = self.graphs[b] = self._capture(b)
            except Exception as exc:  # any capture trouble: decode eagerly from now on
                logger.warning(f"CUDA graph capture of the decode step failed ({exc}); decoding eagerly")
                self.off = True
                return None
            return entry[2]  # the capture's checked replay already computed this step
        attn, graph, out = entry
        self.runner.attention_mask(b, 0, self.runner.max_len, out=attn)
        graph.replay()
        return out

    def _capture(self, b: int):
        r = self.runner
        attn = r.attention_mask(b, 0, r.max_len)

        def step() -> torch.Tensor:
            return r.forward_step(b, attn, 0, r.max_len)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: writes this step's keys, which the replay writes again
            for _ in range(2):
                eager = step().clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        if not torch.allclose(out.float(), eager.float(), atol=1e-2, rtol=1e-2):
            raise RuntimeError(f"the replay of bucket {b} differs from the eager step")
        logger.info(f"captured the decode step for {b} slots in a CUDA graph")
        return attn, graph, out
