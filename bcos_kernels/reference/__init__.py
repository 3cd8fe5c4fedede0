"""Exact pure-PyTorch references of the original code: the specification and the oracle of every test."""
