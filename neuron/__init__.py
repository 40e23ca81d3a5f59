"""neuron: a node of a Bittensor-style verifiable inference network."""

__version__ = "0.1.0"
