"""The chain: one narrow interface, two implementations (the bittensor SDK, a local SQLite chain)."""

from neuron.chain.base import AxonAddress, Chain, ChainError, Metagraph, NeuronInfo, NotRegistered

__all__ = ["AxonAddress", "Chain", "ChainError", "Metagraph", "NeuronInfo", "NotRegistered", "open_chain"]


def open_chain(network: str, chain_path: str | None = None, **kwargs) -> Chain:
    """The chain for `network`: `local` is the SQLite chain at `chain_path`; anything else the SDK."""
    if network == "local" and chain_path:
        from neuron.chain.local import LocalChain

        return LocalChain(chain_path, **kwargs)
    from neuron.chain.subtensor import SubtensorChain

    return SubtensorChain(network, **kwargs)
