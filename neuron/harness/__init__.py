"""Harnesses apart from production (nothing a miner, validator or gateway runs imports them): the mock network,
the cheat registry and the cheating miner, calibration, the benches, a direct seeded decoder, simulated users."""
