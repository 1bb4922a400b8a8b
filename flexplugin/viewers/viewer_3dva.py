"""Viewers of 3D variability analysis and 3D variability display: the engine's PNGs (coordinates, explained
variance, convergence, component slices, clusters, frame counts), the protocol's slice montages, and the volume
series or cluster maps in ChimeraX when one is configured. Nothing is computed here."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer
from pyworkflow.viewer import DESKTOP_TKINTER, View

from flexplugin.protocols import FlexPluginProt3DVA, FlexPluginProt3DVADisplay

from .views import ChimeraOrPngMixin, writeMapsChimeraScript, writeSeriesChimeraScript

__all__ = ["FlexPlugin3DVAViewer", "FlexPlugin3DVADisplayViewer"]

MODE_SIMPLE, MODE_INTERMEDIATES, MODE_CLUSTER = 0, 1, 2  # FlexPluginProt3DVADisplay.mode


class FlexPlugin3DVAViewer(ChimeraOrPngMixin, EmProtocolViewer):
    """3DVA diagnostics: coordinate histograms and pair plots, explained variance, convergence, component slices."""

    _label = "3D variability analysis viewer"
    _targets = [FlexPluginProt3DVA]
    _environments = [DESKTOP_TKINTER]
    # form entry -> (3dva plot name, window title)
    _PLOTS = {"showHistograms": ("histograms", "3DVA: coordinate histograms"),
              "showPairs": ("pairs", "3DVA: coordinate pairs"),
              "showExplainedVariance": ("explained_variance", "3DVA: explained variance"),
              "showConvergence": ("convergence", "3DVA: convergence"),
              "showComponents": ("components", "3DVA: consensus and component slices")}

    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Diagnostics")
        form.addParam("showHistograms", params.LabelParam, label="Coordinate histograms",
                      help="Histogram of the particles' reaction coordinates along each component. Two peaks hint "
                           "at discrete states; a broad single peak at continuous motion.")
        form.addParam("showPairs", params.LabelParam, label="Coordinate pairs",
                      help="Density (hexbin) of the coordinates for each pair of components (K > 1 only).")
        form.addParam("showExplainedVariance", params.LabelParam, label="Explained variance",
                      help="Variance of the model density along each component (the eigenvalues), with the noise "
                           "floor when it was estimated.")
        form.addParam("showConvergence", params.LabelParam, label="Convergence",
                      help="Objective (negative log-likelihood per particle) and subspace change per iteration: "
                           "both should level off.")
        form.addParam("showComponents", params.LabelParam, label="Component slices",
                      help="Central z, y and x slices of the consensus map (grey) and of each component (red "
                           "positive, blue negative): where density appears and disappears along a component.")
        form.addParam("showChimera", params.LabelParam, label="Consensus and components in ChimeraX",
                      help="Opens the consensus map and the component maps side by side in ChimeraX when it is "
                           "configured in Scipion; otherwise shows the component slices. The script is written to "
                           "extra/chimerax_components.cxc either way.")

    def _getVisualizeDict(self) -> dict:
        visualize = {name: self._showPlot for name in self._PLOTS}
        visualize["showChimera"] = self._showChimera
        return visualize

    def _showPlot(self, paramName: str | None = None) -> list[View]:
        """One of 3dva's PNGs, chosen by the form entry."""
        name, title = self._PLOTS[paramName]
        path = self.protocol.getPlotFiles().get(name)
        if path is None:
            return [self.infoMessage("A run with one component has no pair plot.", title)]
        return self._pngViews(path, title)

    def _showChimera(self, paramName: str | None = None) -> list[View]:
        """Consensus and components in ChimeraX, or the component slices when ChimeraX is absent."""
        run = self.protocol.getRunInfo()
        if run is None:
            return [self.errorMessage("The analysis has not finished yet.", "Components in ChimeraX")]
        maps = [self.protocol.getRunFile(run["files"]["consensus"])]
        maps += [self.protocol.getRunFile(f) for f in run["files"]["components"]]
        missing = [m for m in maps if not os.path.exists(m)]
        if missing:
            return [self.errorMessage(f"Missing {', '.join(missing)}: was the run deleted?", "Components in ChimeraX")]
        script = writeMapsChimeraScript(self.protocol.getExtraFile("chimerax_components.cxc"), maps)
        return self._chimeraOrPngViews(script, [(self.protocol.getPlotFiles()["components"],
                                                 "3DVA: consensus and component slices")])


class FlexPlugin3DVADisplayViewer(ChimeraOrPngMixin, EmProtocolViewer):
    """3DVA display results: the frame series (or cluster maps) in ChimeraX or as slice montages, the clusters of
    the coordinates, and the particles per intermediate frame."""

    _label = "3D variability display viewer"
    _targets = [FlexPluginProt3DVADisplay]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Visualization")
        form.addParam("showChimera", params.LabelParam, label="Maps in ChimeraX",
                      help="Simple and intermediates: each component's frames as a ChimeraX volume series, played "
                           "back and forth. Cluster: the cluster maps side by side. Needs ChimeraX configured in "
                           "Scipion; otherwise the slice montages are shown. The script is written to "
                           "extra/chimerax_display.cxc either way.")
        form.addParam("showMontages", params.LabelParam, label="Slice montages",
                      help="Central z-slices of each component's frames (one window per component), or of the "
                           "cluster maps.")
        form.addParam("showClusters", params.LabelParam, label="Clusters (cluster mode)",
                      help="The particles' coordinates coloured by k-means cluster, with the cluster centres.")
        form.addParam("showFrameCounts", params.LabelParam, label="Particles per frame (intermediates)",
                      help="The number of particles (sum of window weights) in each intermediate frame: frames "
                           "with few particles give noisy maps.")

    def _getVisualizeDict(self) -> dict:
        return {"showChimera": self._showChimera, "showMontages": self._showMontages,
                "showClusters": self._showClusters, "showFrameCounts": self._showFrameCounts}

    def _montages(self) -> list[tuple[str, str]]:
        """(montage PNG, title) of each series, or of the cluster maps."""
        prot = self.protocol
        if prot.mode.get() == MODE_CLUSTER:
            return [(prot.getClusterMontageFile(), "3DVA display: cluster maps")] if prot.getClusterMapFiles() else []
        return [(s["montage"], f"3DVA display: component {s['component']}") for s in prot.getSeriesFiles()
                if s["volumes"]]

    def _showMontages(self, paramName: str | None = None) -> list[View]:
        """One slice montage per component series (or of the cluster maps)."""
        montages = self._montages()
        if not montages:
            return [self.errorMessage("No maps yet: has the run finished (with reconstruction)?", "Slice montages")]
        views = []
        for path, title in montages:
            views += self._pngViews(path, title)
        return views

    def _showChimera(self, paramName: str | None = None) -> list[View]:
        """Volume series (or cluster maps) in ChimeraX, or the slice montages when ChimeraX is absent."""
        prot = self.protocol
        script = prot.getExtraFile("chimerax_display.cxc")
        if prot.mode.get() == MODE_CLUSTER:
            maps = [fn for _, fn in sorted(prot.getClusterMapFiles().items())]
            volumes = maps
        else:
            series = [s["volumes"] for s in prot.getSeriesFiles() if s["volumes"]]
            volumes = [v for s in series for v in s]
        missing = [v for v in volumes if not os.path.exists(v)]
        if not volumes or missing:
            return [self.errorMessage("The maps are missing: has the run finished (with reconstruction)?",
                                      "Maps in ChimeraX")]
        if prot.mode.get() == MODE_CLUSTER:
            writeMapsChimeraScript(script, maps)
        else:
            writeSeriesChimeraScript(script, series)
        return self._chimeraOrPngViews(script, self._montages())

    def _showClusters(self, paramName: str | None = None) -> list[View]:
        """clusters.png (cluster mode)."""
        if self.protocol.mode.get() != MODE_CLUSTER:
            return [self.infoMessage("Only the cluster mode makes clusters.", "Clusters")]
        return self._pngViews(self.protocol.getPlotFiles()["clusters"], "3DVA display: clusters")

    def _showFrameCounts(self, paramName: str | None = None) -> list[View]:
        """frame_counts.png (intermediates)."""
        if self.protocol.mode.get() != MODE_INTERMEDIATES:
            return [self.infoMessage("Only the intermediates mode counts particles per frame.", "Particles per frame")]
        return self._pngViews(self.protocol.getPlotFiles()["frame_counts"], "3DVA display: particles per frame")
