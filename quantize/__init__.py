"""Offline half: calibration, GPTQ/RTN, the checkpoint format, perplexity eval."""
