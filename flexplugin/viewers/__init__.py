"""flexplugin's Scipion viewers (found by Scipion through the classes imported here)."""
from .viewer_flex import FlexPluginMeshViewer, FlexPluginTrainViewer, PngView, chimeraxProgram

__all__ = ["FlexPluginMeshViewer", "FlexPluginTrainViewer", "PngView", "chimeraxProgram"]
