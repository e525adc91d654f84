"""Serving: `python -m serve` verifies the package and starts vLLM on it; `python -m serve smoke` checks an endpoint."""
