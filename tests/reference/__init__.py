"""Reference tests: our engine against independent programs and data (RELION, cisTEM, cryoDRGN)."""
