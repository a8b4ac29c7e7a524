"""Serving edits over HTTP: the engine thread (batcher), jobs, the inversion cache, the API."""
