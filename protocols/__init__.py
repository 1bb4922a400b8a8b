"""flexplugin's Scipion protocols (installed as flexplugin.protocols).

Scipion keeps only protocol classes imported here (their module must lie under flexplugin.protocols).
"""
from .constants import FLEX_PROGNAME, VA3D_PROGNAME
from .protocol_3dva import FlexPluginProt3DVA
from .protocol_3dva_display import FlexPluginProt3DVADisplay
from .protocol_base import FlexPluginProtBase
from .protocol_flex_generate import FlexPluginProtGenerate
from .protocol_flex_mesh import FlexPluginProtMeshPrep
from .protocol_flex_reconstruct import FlexPluginProtReconstruct
from .protocol_flex_train import FlexPluginProtTrain
from .protocol_simulate import FlexPluginProtSimulate
from .protocol_subset import FlexPluginProtSubset
