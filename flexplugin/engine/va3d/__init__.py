"""3D Variability Analysis (PPCA by EM in Fourier space) and its Display modes; see em.py and display.py."""
from .em import VA3D, VA3DConfig, VA3DResult, working_box  # noqa: F401
