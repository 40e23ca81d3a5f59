"""neuron: a node of a Bittensor-style verifiable inference network."""

import os

# OpenMP threads that spin while they wait stall torch on small or contended CPUs: measured here,
# 8 tokens of the tiny model took 270 ms with the default policy against 9 ms with PASSIVE, and a
# 125M forward ran 4x slower while another process held a core (same speed on an idle machine).
# libgomp reads this once, when torch loads, so it is set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
