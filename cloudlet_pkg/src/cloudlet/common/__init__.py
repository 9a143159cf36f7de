"""Leaf helpers every layer may use (names, ...); this package imports nothing else of ``cloudlet``."""
