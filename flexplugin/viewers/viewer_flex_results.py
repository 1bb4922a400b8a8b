"""Viewers of 3D Flex generate and 3D Flex reconstruction: the engine's PNGs (atlas, series montages, FSC, map
slices) and the volumes in ChimeraX when one is configured. Nothing is computed here."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer
from pyworkflow.viewer import DESKTOP_TKINTER, View

from flexplugin.protocols import FlexPluginProtGenerate, FlexPluginProtReconstruct

from .views import ChimeraOrPngMixin, writeGainChimeraScript, writeMapsChimeraScript, writeSeriesChimeraScript

__all__ = ["FlexPluginGenerateViewer", "FlexPluginReconstructViewer"]


class FlexPluginGenerateViewer(ChimeraOrPngMixin, EmProtocolViewer):
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
        script = writeSeriesChimeraScript(self.protocol.getExtraFile("chimerax_series.cxc"),
                                          [s["volumes"] for s in series])
        return self._chimeraOrPngViews(script, [(s["montage"], f"3D flex generate: {s['name']}") for s in series])


class FlexPluginReconstructViewer(ChimeraOrPngMixin, EmProtocolViewer):
    """Reconstruction results: flex vs noflex FSC (also masked and corrected), slices of the maps, the local
    resolution gain, and the maps in ChimeraX."""

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
        form.addParam("showFscMasked", params.LabelParam, label="Masked FSC, corrected",
                      help="Per map: the unmasked, masked and phase-randomised masked half-map FSCs and the masked "
                           "FSC corrected by phase randomisation (RELION's post-processing), with the 0.143 "
                           "threshold. Without a mask only the unmasked FSCs are drawn.")
        form.addParam("showGain", params.LabelParam, label="Local resolution gain",
                      help="Local resolution (Å) of the noflex and flex maps and their difference, noflex − flex "
                           "(Å; red: the flex map is sharper there), on slices through the mask's centre.")
        form.addParam("showGainChimera", params.LabelParam, label="Gain on the map in ChimeraX",
                      help="The flex map's surface coloured by the local resolution gain (blue: worse, white: equal, "
                           "red: sharper with flex) when ChimeraX is configured in Scipion; otherwise the gain "
                           "slices. The script is written to extra/chimerax_gain.cxc either way.")

    def _getVisualizeDict(self) -> dict:
        return {"showFsc": self._showFsc, "showSlices": self._showSlices, "showChimera": self._showChimera,
                "showFscMasked": self._showFscMasked, "showGain": self._showGain,
                "showGainChimera": self._showGainChimera}

    def _showFscMasked(self, paramName: str | None = None) -> list[View]:
        """fsc_masked.png."""
        return self._pngViews(self.protocol.getPlotFiles()["fscMasked"],
                              "3D flex reconstruction: masked FSC, corrected by phase randomisation")

    def _showGain(self, paramName: str | None = None) -> list[View]:
        """locres_gain.png."""
        return self._pngViews(self.protocol.getPlotFiles()["gain"], "3D flex reconstruction: local resolution gain")

    def _showGainChimera(self, paramName: str | None = None) -> list[View]:
        """The flex map coloured by the gain in ChimeraX, or the gain slices when ChimeraX is absent."""
        files = self.protocol.getLocalResolutionFiles()
        maps = self.protocol.getMapFiles()
        if "gain" not in files or not os.path.exists(maps["flex"][0]):
            return [self.errorMessage("No local resolution gain: has the run finished, with the noflex "
                                      "reconstruction?", "Gain in ChimeraX")]
        gain = (self.protocol.getResolutionInfo() or {}).get("gain", {})
        span = max(abs(gain.get("min_A") or 0.0), abs(gain.get("max_A") or 0.0))
        script = writeGainChimeraScript(self.protocol.getExtraFile("chimerax_gain.cxc"), maps["flex"][0],
                                        files["gain"], span)
        return self._chimeraOrPngViews(script, [(self.protocol.getPlotFiles()["gain"],
                                                 "3D flex reconstruction: local resolution gain")])

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
        script = writeMapsChimeraScript(self.protocol.getExtraFile("chimerax_maps.cxc"), maps)
        return self._chimeraOrPngViews(script, [(self.protocol.getPlotFiles()["maps"],
                                                 "3D flex reconstruction: map slices")])
