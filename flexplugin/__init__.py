"""flexplugin: open 3D Variability Analysis and 3D Flex for Scipion, natively in PyTorch.

The engine (`flexplugin.engine`, `flexplugin.cli`) runs without Scipion; the Scipion `Plugin` class is
defined only when pyworkflow/pwem are importable.
"""
from .version import __version__

try:
    import pwem as _pwem  # noqa: F401
except ImportError:  # standalone engine install
    _pwem = None

if _pwem is not None:
    from .plugin import Plugin  # noqa: F401
