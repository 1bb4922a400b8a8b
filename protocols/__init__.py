"""flexplugin's Scipion protocols (installed as flexplugin.protocols)."""
