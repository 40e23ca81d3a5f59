"""Harnesses apart from production: cheating miners for the mock network, a direct seeded decoder, calibration."""
