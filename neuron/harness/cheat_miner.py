"""A cheating miner for the mock network: `python -m neuron.harness.cheat_miner --kind KIND <miner flags>`.

The production miner has no cheat switch; this entry point wires one cheat of the registry (neuron.harness.cheats) into
the same miner (a cheating model, servicer or sampler) and refuses any chain but the local one.
"""

from __future__ import annotations

import asyncio
import sys

from loguru import logger

from neuron import config as cfg
from neuron.harness import cheats


def main(argv: list[str]) -> int:
    from neuron import logs
    from neuron.cli import _chain
    from neuron.miner import run_miner
    from neuron.wallets import open_wallet

    if len(argv) < 2 or argv[0] != "--kind":
        print(f"usage: python -m neuron.harness.cheat_miner --kind KIND <miner flags>; KIND is one of "
              f"{', '.join(cheats.KINDS)}", file=sys.stderr)
        return 2
    kind, rest = argv[1], argv[2:]
    try:
        cheats.lookup(kind)
    except ValueError as exc:
        raise cfg.ConfigError(f"--kind {kind}: {exc}") from None
    c = cfg.load(cfg.MinerConfig, None, cfg.parse_dotted(rest))
    if c.subtensor.network != "local":
        raise cfg.ConfigError("a cheating miner is for the mock network only: it needs --subtensor.network local")
    logs.setup(c.logging, f"cheat_miner_{kind}")
    chain = _chain(c.subtensor)
    wallet = open_wallet(c.wallet)
    logger.warning(f"this miner cheats ({kind}): for the mock network only")
    return asyncio.run(run_miner(c, chain, wallet, servicer_factory=cheats.servicer_for(kind),
                                 model_transform=lambda lm: cheats.cheat_model(kind, lm)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
