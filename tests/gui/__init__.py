"""GUI tests: the real Scipion GUI on a private Xvfb display."""
