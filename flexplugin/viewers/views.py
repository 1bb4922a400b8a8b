"""Views every flexplugin viewer shares: the engine's PNGs in a window, ChimeraX scripts for maps, series and
meshes, and the two viewer mixins that pick ChimeraX when it is configured. Nothing is computed here."""
from __future__ import annotations

import os

from pwem.viewers.views import ImageView
from pyworkflow.viewer import View

__all__ = ["PngView", "chimeraxProgram", "writeMeshChimeraScript", "writeSeriesChimeraScript", "writeMapsChimeraScript",
           "writeGainChimeraScript", "FlexViewerMixin", "ChimeraOrPngMixin"]


class PngView(ImageView):
    """A PNG drawn by the engine, shown in a matplotlib window (pyworkflow's Plotter, Tk in the GUI)."""

    def __init__(self, imagePath: str, title: str = ""):
        super().__init__(imagePath)
        self._title = title or os.path.basename(imagePath)

    def getTitle(self) -> str:
        """The window title."""
        return self._title

    def createPlotter(self):
        """A Plotter whose figure holds the image at its natural size (not shown yet)."""
        import matplotlib.image as mpimg

        from pyworkflow.gui.plotter import Plotter
        img = mpimg.imread(self.getImagePath())
        height, width = img.shape[:2]
        dpi = 100
        plotter = Plotter(figsize=(width / dpi, height / dpi), dpi=dpi, windowTitle=self._title)
        plotter.tightLayoutOn = False
        ax = plotter.getFigure().add_axes((0, 0, 1, 1))
        ax.imshow(img)
        ax.set_axis_off()
        return plotter

    def show(self) -> None:
        """Open the image window."""
        self.createPlotter().show()


def chimeraxProgram() -> str | None:
    """The ChimeraX binary Scipion is configured with (scipion-em-chimera or pwem's default), if it exists."""
    try:
        from pwem.viewers.viewer_chimera import Chimera
        program = Chimera.getProgram()
    except Exception:  # noqa: BLE001  (no chimera plugin, broken config: ChimeraX is optional)
        return None
    return program if program and os.path.exists(program) else None


def writeMeshChimeraScript(scriptPath: str, mapFile: str, pdbFile: str) -> str:
    """A ChimeraX script opening a map and mesh.pdb in the same frame (map voxel 0 at 0 Å, as in mesh.pdb)."""
    lines = [f'open "{os.path.abspath(mapFile)}"',
             "volume #1 origin 0,0,0 style surface transparency 0.6",
             f'open "{os.path.abspath(pdbFile)}"',
             "style #2 stick",
             "color byattribute bfactor #2 palette bluered",
             "view"]
    os.makedirs(os.path.dirname(os.path.abspath(scriptPath)), exist_ok=True)
    with open(scriptPath, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return scriptPath


class FlexViewerMixin:
    """Views shared by the mesh and training viewers."""

    def _pngViews(self, path: str, title: str) -> list[View]:
        """The PNG in a window, or an error message naming the missing file."""
        if not os.path.exists(path):
            return [self.errorMessage(f"{path} does not exist: has the run finished?", title)]
        return [PngView(path, title)]

    def _meshChimeraViews(self, mapFile: str | None, pdbFile: str, scriptPath: str) -> list[View]:
        """mesh.pdb over a map in ChimeraX; a message (with the script to open by hand) when ChimeraX is absent."""
        missing = [f for f in (mapFile, pdbFile) if not f or not os.path.exists(f)]
        if missing:
            return [self.errorMessage(f"Missing {', '.join(str(m) for m in missing)}: has the run finished?",
                                      "Mesh in ChimeraX")]
        writeMeshChimeraScript(scriptPath, mapFile, pdbFile)
        program = chimeraxProgram()
        if program is None:
            return [self.infoMessage("ChimeraX is not configured in Scipion (install scipion-em-chimera). Open "
                                     f"this script in ChimeraX to see the mesh over the map:\n{scriptPath}",
                                     "Mesh in ChimeraX")]
        from pwem.viewers.viewer_chimera import ChimeraView
        return [ChimeraView(os.path.abspath(scriptPath))]


def _quoted(path: str) -> str:
    return f'"{os.path.abspath(path)}"'


def _writeScript(scriptPath: str, lines: list[str]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(scriptPath)), exist_ok=True)
    with open(scriptPath, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return scriptPath


def writeSeriesChimeraScript(scriptPath: str, series: list[list[str]]) -> str:
    """A ChimeraX script opening each list of maps as a volume series (model #1, #2, ...), side by side, playing
    back and forth."""
    lines = []
    for k, files in enumerate(series, 1):
        lines.append("open " + " ".join(_quoted(f) for f in files) + " vseries true")
        lines.append(f"vseries play #{k} loop true direction oscillate")
    if len(series) > 1:
        lines.append("tile")
    lines.append("view")
    return _writeScript(scriptPath, lines)


def writeMapsChimeraScript(scriptPath: str, maps: list[str]) -> str:
    """A ChimeraX script opening maps (model #1, #2, ...) side by side."""
    lines = [f"open {_quoted(m)}" for m in maps]
    if len(maps) > 1:
        lines.append("tile")
    lines.append("view")
    return _writeScript(scriptPath, lines)


def writeGainChimeraScript(scriptPath: str, mapFile: str, gainFile: str, span: float) -> str:
    """A ChimeraX script showing the map's surface coloured by the local resolution gain (blue −span … white 0 …
    red +span Å: red where the flex map is sharper)."""
    span = max(float(span), 0.1)
    lines = [f"open {_quoted(mapFile)}", f"open {_quoted(gainFile)}", "volume #2 hide",
             f"color sample #1 map #2 palette blue:white:red range {-span:g},{span:g}", "view"]
    return _writeScript(scriptPath, lines)


class ChimeraOrPngMixin(FlexViewerMixin):
    """ChimeraX when configured, else the engine's PNGs (their titles say ChimeraX is not configured)."""

    def _chimeraOrPngViews(self, scriptPath: str, pngs: list[tuple[str, str]]) -> list[View]:
        """The script in ChimeraX, or each (PNG, title) in a window."""
        if chimeraxProgram() is not None:
            from pwem.viewers.viewer_chimera import ChimeraView
            return [ChimeraView(os.path.abspath(scriptPath))]
        views = []
        for path, name in pngs:
            views += self._pngViews(path, f"{name} (ChimeraX is not configured)")
        return views
