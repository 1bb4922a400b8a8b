"""Viewers of 3D Flex mesh prep and training: they show the PNG diagnostics the engine drew and open the mesh
over a map in ChimeraX when one is configured. Nothing is computed here."""
from __future__ import annotations

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer
from pyworkflow.viewer import DESKTOP_TKINTER, View

from flexplugin.protocols import FlexPluginProtMeshPrep, FlexPluginProtTrain

from .views import FlexViewerMixin

__all__ = ["FlexPluginMeshViewer", "FlexPluginTrainViewer"]


class FlexPluginMeshViewer(FlexViewerMixin, EmProtocolViewer):
    """Mesh prep results: slices of the tetra cells and rigidity weights; the mesh over the map in ChimeraX."""

    _label = "3D flex mesh viewer"
    _targets = [FlexPluginProtMeshPrep]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Visualization")
        form.addParam("showMeshSlices", params.LabelParam, label="Mesh slices",
                      help="Central slices of the map with the tetra cells and the rigidity weight of each cell "
                           "(1 in dense regions, lower in solvent; 20 for rigid segments).")
        form.addParam("showMeshChimera", params.LabelParam, label="Mesh over the map in ChimeraX",
                      help="Opens the mesh (mesh.pdb: a vertex per atom, coloured by rigidity weight) over the map "
                           "it was built on, when ChimeraX is configured in Scipion.")

    def _getVisualizeDict(self) -> dict:
        return {"showMeshSlices": self._showMeshSlices, "showMeshChimera": self._showMeshChimera}

    def _showMeshSlices(self, paramName: str | None = None) -> list[View]:
        """mesh_slices.png."""
        return self._pngViews(self.protocol.getMeshFiles()["slices"], "3D flex mesh: slices")

    def _showMeshChimera(self, paramName: str | None = None) -> list[View]:
        """mesh.pdb over the (cropped) consensus map."""
        return self._meshChimeraViews(self.protocol.getMeshMapFile(), self.protocol.getMeshFiles()["pdb"],
                                      self.protocol.getExtraFile("chimerax_mesh.cxc"))


class FlexPluginTrainViewer(FlexViewerMixin, EmProtocolViewer):
    """Training diagnostics: latent scatter, generator activations, example flow, losses, and the mesh."""

    _label = "3D flex training viewer"
    _targets = [FlexPluginProtTrain]
    _environments = [DESKTOP_TKINTER]
    # form entry -> (flex-train plot name, window title)
    _PLOTS = {"showLatents": ("latents", "3D flex: latent coordinates"),
              "showActivations": ("activations", "3D flex: flow generator activations"),
              "showFlow": ("flow", "3D flex: example flow"),
              "showLosses": ("losses", "3D flex: losses")}

    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Diagnostics")
        form.addParam("showLatents", params.LabelParam, label="Latent coordinates",
                      help="Scatter plots of pairs of latent dimensions over (-1.5, 1.5), with a little jitter. "
                           "Shapes seen early often relax towards a Gaussian; many points at ±1.5 ask for a "
                           "stronger latent centering.")
        form.addParam("showActivations", params.LabelParam, label="Flow generator activations",
                      help="Activations of the flow generator's layers along latent 1 (-1.5..1.5): they should "
                           "be neither flat nor very squiggly.")
        form.addParam("showFlow", params.LabelParam, label="Example flow",
                      help="A slice of the canonical map coloured by the x, y, z components of the flow of the "
                           "particle furthest along latent 1. Noisy colour suggests overfitting; no colour, no "
                           "motion.")
        form.addParam("showLosses", params.LabelParam, label="Losses",
                      help="Data, rigidity and latent prior terms per epoch.")
        form.addSection(label="Mesh")
        form.addParam("showMeshSlices", params.LabelParam, label="Mesh slices",
                      help="Slices of the mesh used for training: tetra cells and rigidity weights.")
        form.addParam("showMeshChimera", params.LabelParam, label="Mesh over the canonical map in ChimeraX",
                      help="Opens mesh.pdb over the canonical map (both span the crop box), when ChimeraX is "
                           "configured in Scipion.")

    def _getVisualizeDict(self) -> dict:
        return {"showLatents": self._showPlot, "showActivations": self._showPlot, "showFlow": self._showPlot,
                "showLosses": self._showPlot, "showMeshSlices": self._showMeshSlices,
                "showMeshChimera": self._showMeshChimera}

    def _showPlot(self, paramName: str | None = None) -> list[View]:
        """One of flex-train's PNGs, chosen by the form entry."""
        name, title = self._PLOTS[paramName]
        return self._pngViews(self.protocol.getPlotFiles()[name], title)

    def _showMeshSlices(self, paramName: str | None = None) -> list[View]:
        """mesh_slices.png of the mesh used."""
        return self._pngViews(self.protocol.getMeshFiles()["slices"], "3D flex training: mesh slices")

    def _showMeshChimera(self, paramName: str | None = None) -> list[View]:
        """mesh.pdb over canonical.mrc."""
        return self._meshChimeraViews(self.protocol.getTrainFile("canonical"),
                                      self.protocol.getMeshFiles()["pdb"],
                                      self.protocol.getExtraFile("chimerax_mesh.cxc"))
