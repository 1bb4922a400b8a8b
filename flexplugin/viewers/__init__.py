"""flexplugin's Scipion viewers (found by Scipion through the classes imported here)."""
from .viewer_flex import FlexPluginMeshViewer, FlexPluginTrainViewer
from .viewer_flex_results import FlexPluginGenerateViewer, FlexPluginReconstructViewer
from .views import PngView, chimeraxProgram

__all__ = ["FlexPluginMeshViewer", "FlexPluginTrainViewer", "PngView", "chimeraxProgram",
           "FlexPluginGenerateViewer", "FlexPluginReconstructViewer"]
from .viewer_3dva import FlexPlugin3DVADisplayViewer, FlexPlugin3DVAViewer  # noqa: E402

__all__ += ["FlexPlugin3DVAViewer", "FlexPlugin3DVADisplayViewer"]
from .viewer_subset import FlexPluginSubsetViewer  # noqa: E402

__all__ += ["FlexPluginSubsetViewer"]
