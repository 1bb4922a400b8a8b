"""Viewers of 3D Flex generate and 3D Flex reconstruction: the engine's PNGs (atlas, series montages, FSC, map
slices) and the volumes in ChimeraX when one is configured. Nothing is computed here."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, View
from pwem.viewers import EmProtocolViewer

from flexplugin.protocols import FlexPluginProtGenerate, FlexPluginProtReconstruct

from .viewer_flex import _FlexViewerMixin, chimeraxProgram

__all__ = ["FlexPluginGenerateViewer", "FlexPluginReconstructViewer", "writeSeriesChimeraScript",
           "writeMapsChimeraScript"]


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


class _ChimeraOrPngMixin(_FlexViewerMixin):
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


class FlexPluginGenerateViewer(_ChimeraOrPngMixin, EmProtocolViewer):
    """Generated volumes: the latent atlas, montages of each series, and the series in ChimeraX."""

    _label = "3D flex generate viewer"
    _targets = [FlexPluginProtGenerate]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Visualization")
        form.addParam("showAtlas", params.LabelParam, label="Latent atlas",
                      help="Generated volumes (projected along z) on a grid over two latent axes, drawn over the "
                           "density of the particles' latents.")
        form.addParam("showMontages", params.LabelParam, label="Series montages",
                      help="Central z-slices of the volumes of each series (one window per latent axis, or one for "
                           "custom points).")
        form.addParam("showChimera", params.LabelParam, label="Volume series in ChimeraX",
                      help="Opens each series as a ChimeraX volume series (played back and forth), when ChimeraX is "
                           "configured in Scipion; otherwise shows the series montages. The script is written to "
                           "extra/chimerax_series.cxc either way.")

    def _getVisualizeDict(self) -> dict:
        return {"showAtlas": self._showAtlas, "showMontages": self._showMontages, "showChimera": self._showChimera}

    def _showAtlas(self, paramName: str | None = None) -> list[View]:
        """atlas.png."""
        return self._pngViews(self.protocol.getAtlasFile(), "3D flex generate: latent atlas")

    def _showMontages(self, paramName: str | None = None) -> list[View]:
        """One montage PNG per series."""
        series = self.protocol.getSeriesFiles()
        if not series:
            return [self.errorMessage("No volumes generated yet: has the run finished?", "Series montages")]
        views = []
        for s in series:
            views += self._pngViews(s["montage"], f"3D flex generate: {s['name']}")
        return views

    def _showChimera(self, paramName: str | None = None) -> list[View]:
        """The volume series in ChimeraX, or the montages when ChimeraX is absent."""
        series = self.protocol.getSeriesFiles()
        missing = [v for s in series for v in s["volumes"] if not os.path.exists(v)]
        if not series or missing:
            return [self.errorMessage("Generated volumes are missing: has the run finished?", "Volume series")]
        script = writeSeriesChimeraScript(self.protocol._getExtraPath("chimerax_series.cxc"),
                                          [s["volumes"] for s in series])
        return self._chimeraOrPngViews(script, [(s["montage"], f"3D flex generate: {s['name']}") for s in series])


class FlexPluginReconstructViewer(_ChimeraOrPngMixin, EmProtocolViewer):
    """Reconstruction results: flex vs noflex FSC, slices of the maps, and the maps in ChimeraX."""

    _label = "3D flex reconstruction viewer"
    _targets = [FlexPluginProtReconstruct]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Visualization")
        form.addParam("showFsc", params.LabelParam, label="FSC: flex vs noflex",
                      help="Half-map FSC of the flex map and of the rigid (noflex) map against spatial frequency "
                           "(1/Å), with the 0.143 and 0.5 thresholds.")
        form.addParam("showSlices", params.LabelParam, label="Map slices",
                      help="Central z, y and x slices of the flex and noflex maps.")
        form.addParam("showChimera", params.LabelParam, label="Maps in ChimeraX",
                      help="Opens the flex and noflex maps side by side in ChimeraX when it is configured in "
                           "Scipion; otherwise shows the map slices. The script is written to "
                           "extra/chimerax_maps.cxc either way.")

    def _getVisualizeDict(self) -> dict:
        return {"showFsc": self._showFsc, "showSlices": self._showSlices, "showChimera": self._showChimera}

    def _showFsc(self, paramName: str | None = None) -> list[View]:
        """fsc.png (both curves)."""
        return self._pngViews(self.protocol.getPlotFiles()["fsc"], "3D flex reconstruction: FSC")

    def _showSlices(self, paramName: str | None = None) -> list[View]:
        """maps.png."""
        return self._pngViews(self.protocol.getPlotFiles()["maps"], "3D flex reconstruction: map slices")

    def _showChimera(self, paramName: str | None = None) -> list[View]:
        """The flex and noflex maps in ChimeraX, or their slices when ChimeraX is absent."""
        maps = [files[0] for files in self.protocol.getMapFiles().values()]
        missing = [m for m in maps if not os.path.exists(m)]
        if missing:
            return [self.errorMessage(f"Missing {', '.join(missing)}: has the run finished?", "Maps in ChimeraX")]
        script = writeMapsChimeraScript(self.protocol._getExtraPath("chimerax_maps.cxc"), maps)
        return self._chimeraOrPngViews(script, [(self.protocol.getPlotFiles()["maps"],
                                                 "3D flex reconstruction: map slices")])
