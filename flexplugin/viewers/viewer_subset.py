"""Viewer of the latent subset protocol: the latent scatter with the kept particles highlighted, and the kept
particles in Scipion's set viewer. Nothing is computed here (the protocol drew the plot)."""
from __future__ import annotations

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer, ObjectView
from pyworkflow.viewer import DESKTOP_TKINTER, View

from flexplugin.protocols import FlexPluginProtSubset

from .views import FlexViewerMixin

__all__ = ["FlexPluginSubsetViewer"]


class FlexPluginSubsetViewer(FlexViewerMixin, EmProtocolViewer):
    """Latent subset: where the kept particles lie in the latent space, and the kept particles themselves."""

    _label = "latent subset viewer"
    _targets = [FlexPluginProtSubset]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Visualization")
        form.addParam("showSelection", params.LabelParam, label="Latent space and selection",
                      help="Scatter of every pair of latent dimensions (first four), the kept particles in red, the "
                           "others in grey; in cluster mode the centres are marked with their numbers.")
        form.addParam("showParticles", params.LabelParam, label="Kept particles",
                      help="The kept particles (the SetOfParticlesFlex output) in Scipion's set viewer.")

    def _getVisualizeDict(self) -> dict:
        return {"showSelection": self._showSelection, "showParticles": self._showParticles}

    def _showSelection(self, paramName: str | None = None) -> list[View]:
        """selection.png."""
        return self._pngViews(self.protocol.getPlotFile(), "Latent subset: selection")

    def _showParticles(self, paramName: str | None = None) -> list[View]:
        """The SetOfParticlesFlex output in the set viewer."""
        parts = getattr(self.protocol, "outputParticles", None)
        if parts is None:
            return [self.errorMessage("The run has no output yet.", "Latent subset: particles")]
        return [ObjectView(self._project, self.protocol.strId(), parts.getFileName())]
