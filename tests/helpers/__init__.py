"""Helpers shared by the tests of every floor (reference data cache, Scipion environment, CLI runs)."""
