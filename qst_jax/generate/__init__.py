"""Decoding: the one engine (continuous batching, per-row side networks), requests, sampling, `Generator`."""
