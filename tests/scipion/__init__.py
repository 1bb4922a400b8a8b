"""Scipion tests: protocols, conversions, options and launching in a throwaway project."""
