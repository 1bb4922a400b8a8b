"""Engine and command-line tests: no Scipion needed (a few import pwem lazily for one check)."""
