"""flexplugin's PyTorch engine: image formation, reconstruction, 3DVA and 3D Flex. No Scipion imports."""
