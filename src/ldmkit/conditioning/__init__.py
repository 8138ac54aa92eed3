"""Conditions: what a model is conditioned on and where it comes from (sources.py)."""
