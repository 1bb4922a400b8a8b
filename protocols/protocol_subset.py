"""Latent subset: keep the particles of a SetOfParticlesFlex that lie in a region of their latent space.

The selection is a pure filter on zFlex (flexplugin.latent_select, numpy only), so it runs in the protocol's own
process: no images are read, no torch is imported and no GPU is used, so there is nothing to gain from a queued
engine job (k-means on 10^6 particles × 10 latents takes seconds). Particles keep their ids, so the subsets chain
with any protocol that matches by id.
"""
from __future__ import annotations

import json
from enum import Enum

import numpy as np

import pyworkflow.protocol.params as params
from pwem.objects import Particle, SetOfParticles, SetOfParticlesFlex
from pwem.protocols import ProtFlexBase

from flexplugin import latent_select as ls

from .protocol_base import INPUT_PARTICLES, FlexPluginProtBase, readJsonFile

__all__ = ["FlexPluginProtSubset"]

MODES = ["box", "clusters", "sphere"]
MODE_BOX, MODE_CLUSTERS, MODE_SPHERE = range(3)
UNIT_LABELS = ["latent units", "standard deviations"]  # the order of latent_select.UNITS
FLEX_ATTRS = ["_zFlex", "_zRed", "_flexInfo"]  # what a plain Particle leaves out
SELECTION_JSON = "selection.json"
SELECTION_CSV = "selection.csv"
SELECTION_PNG = "selection.png"


class outputs(Enum):
    outputParticles = SetOfParticlesFlex
    outputPlainParticles = SetOfParticles


class FlexPluginProtSubset(ProtFlexBase, FlexPluginProtBase):
    """Latent subset: keeps the particles of a SetOfParticlesFlex (3DVA coordinates, 3D Flex latents, or any
    FlexHub set with zFlex) that lie in a region of the latent space: a box of per-dimension ranges, chosen
    k-means clusters, or a sphere around a point. Outputs the kept particles twice, with the same ids, poses and
    CTFs: as a SetOfParticlesFlex (zFlex and FlexInfo kept, for flexplugin and FlexHub protocols) and as a plain
    SetOfParticles for re-refinement in RELION, cryoSPARC or any other plugin. A plot shows the latent space with
    the kept particles highlighted."""

    _label = "latent subset"
    _possibleOutputs = outputs
    _requiresCTF = False

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Input")
        form.addParam(INPUT_PARTICLES, params.PointerParam, pointerClass="SetOfParticlesFlex", important=True,
                      label="Particles with latents",
                      help="A SetOfParticlesFlex whose particles carry latent coordinates (zFlex): the output of "
                           "3D variability analysis, 3D flex training, or another FlexHub protocol.")
        form.addParam("mode", params.EnumParam, choices=MODES, default=MODE_BOX,
                      display=params.EnumParam.DISPLAY_HLIST, label="Region",
                      help="box: per-dimension ranges of the latents. clusters: k-means on the latents, keeping "
                           "chosen clusters (run once, look at the plot, then re-run with the clusters you want: "
                           "the clustering is the same for the same seed). sphere: the particles within a radius "
                           "of a latent point.")
        form.addParam("units", params.EnumParam, choices=UNIT_LABELS, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Units",
                      help="latent units: bounds, centre and radius in the latents' own values. standard "
                           "deviations: in (z - mean) / sd of each dimension, so '1: -1 1' keeps about 68 % of "
                           "a Gaussian dimension; with clusters, k-means then runs on the standardised latents "
                           "(use it when dimensions have very different spreads). Default: latent units.")
        form.addParam("boxRanges", params.TextParam, default="1: -1 1", condition=f"mode == {MODE_BOX}",
                      label="Ranges",
                      help="One range per constrained latent dimension, 'dimension: min max', separated by ';' or "
                           "new lines; dimensions are numbered from 1 and those not named are not constrained; * "
                           "leaves a bound open. Example: '1: -1.5 0.5; 2: 0 *' keeps -1.5 <= z1 <= 0.5 and "
                           "z2 >= 0 (bounds included). Default '1: -1 1'.")
        form.addParam("numberOfClusters", params.IntParam, default=3, condition=f"mode == {MODE_CLUSTERS}",
                      label="Number of clusters",
                      help="k of the k-means clustering of the latents (default 3). Clusters are numbered from 1 "
                           "by increasing centre along latent dimension 1, as shown in the plot.")
        form.addParam("clusterIds", params.StringParam, default="1", condition=f"mode == {MODE_CLUSTERS}",
                      label="Clusters to keep",
                      help="The clusters whose particles are kept, numbered from 1, e.g. '1', '1, 3' or '2-4' "
                           "(default 1). The plot and the summary give each cluster's centre and size.")
        form.addParam("seed", params.IntParam, default=0, condition=f"mode == {MODE_CLUSTERS}",
                      expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Seed of the k-means++ initialisation (best of 10 runs). The same seed and input give "
                           "the same clusters; change it only to check that the clusters are stable (default 0).")
        form.addParam("centre", params.StringParam, default="", condition=f"mode == {MODE_SPHERE}",
                      label="Centre",
                      help="The latent point at the centre of the sphere, one value per latent dimension "
                           "separated by commas, e.g. '0.5, -0.2' for two latents (in the chosen units).")
        form.addParam("radius", params.FloatParam, default=0.5, condition=f"mode == {MODE_SPHERE}",
                      label="Radius",
                      help="Particles whose latents lie within this Euclidean distance of the centre are kept "
                           "(in the chosen units; default 0.5).")
        form.addParam("invert", params.BooleanParam, default=False, label="Keep the particles outside?",
                      help="No (default): keep the particles in the region. Yes: keep those outside it, e.g. to "
                           "remove an outlier cluster or a junk region.")

    # --------------------------- INSERT steps functions --------------------
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.createOutputStep, self._getSelectionKey())

    # --------------------------- STEPS functions -----------------------------
    def createOutputStep(self, key: str) -> None:
        """Select by latents, write selection.csv/.json and the plot, then the two subsets (ids preserved).

        `key` holds the settings, so a Scipion Continue with changed settings redoes the selection.
        """
        inputSet = self._getInputParticles()
        ids, z = self._readLatents(inputSet)
        keep, info = self._select(z)
        if info["invert"]:
            keep = ~keep
        if not keep.any():
            spans = "; ".join(f"{d + 1}: {z[:, d].min():.3g} {z[:, d].max():.3g}" for d in range(z.shape[1]))
            raise ValueError(f"No particle lies in the region ({self._describeRegion(info)}). The latents span "
                             f"{spans}: widen the region.")
        info.update(n=int(len(ids)), kept=int(keep.sum()), k=int(z.shape[1]))
        self._writeSelection(ids, z, keep, info)

        keptIds = set(int(i) for i in ids[keep])
        flexSet = self._createSetOfParticlesFlex(progName=inputSet.getFlexInfo().getProgName())
        flexSet.copyInfo(inputSet)  # sampling, alignment, acquisition, FlexInfo
        flexSet.setHasCTF(inputSet.hasCTF())  # copyInfo copies it only between sets of the very same class
        plainSet = self._createSetOfParticles(suffix="_plain")
        plainSet.copyInfo(inputSet)
        plainSet.setHasCTF(inputSet.hasCTF())
        for item in inputSet.iterItems(orderBy="id"):
            if int(item.getObjId()) not in keptIds:
                continue
            flexSet.append(item)
            plain = Particle()
            plain.copy(item, ignoreAttrs=FLEX_ATTRS)  # the id, location, pose, CTF and other attributes
            plainSet.append(plain)

        self._defineOutputs(**{outputs.outputParticles.name: flexSet, outputs.outputPlainParticles.name: plainSet})
        ptr = self._getInputParticles(pointer=True)
        self._defineSourceRelation(ptr, flexSet)
        self._defineSourceRelation(ptr, plainSet)

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        """The input has latents and the region parameters parse (errors say what to write instead)."""
        errors = []
        parts = self._getInputParticles()
        if parts is None:
            return errors
        n = parts.getSize()
        first = parts.getFirstItem() if n else None
        if first is None:
            return ["The input particle set is empty."]
        if not hasattr(first, "getZFlex") or len(first.getZFlex()) == 0:
            return ["The input particles carry no latent coordinates (zFlex): use the particles of a 3D "
                    "variability analysis or 3D flex training run."]
        k = len(first.getZFlex())
        mode = self.mode.get()
        try:
            if mode == MODE_BOX:
                ls.parse_box(self.boxRanges.get(), k)
            elif mode == MODE_CLUSTERS:
                c = self.numberOfClusters.get()
                if c is None or not 1 <= c <= n:
                    errors.append(f"The number of clusters must be between 1 and the number of particles ({n}).")
                else:
                    ls.parse_ids(self.clusterIds.get(), c)
            else:
                ls.parse_point(self.centre.get(), k)
                if self.radius.get() is None or self.radius.get() <= 0:
                    errors.append("The radius must be positive.")
        except ValueError as e:
            label = {MODE_BOX: "Ranges", MODE_CLUSTERS: "Clusters to keep", MODE_SPHERE: "Centre"}[mode]
            errors.append(f"{label}: {e}.")
        return errors

    def _summary(self) -> list[str]:
        info = self.getSelectionInfo()
        if info is None or not self.hasAttribute(outputs.outputParticles.name):
            return ["Output not ready yet."]
        lines = [f"Kept {info['kept']} of {info['n']} particles ({100 * info['kept'] / info['n']:.1f} %) "
                 f"{'outside' if info['invert'] else 'in'} {self._describeRegion(info)}."]
        for c, (size, centre) in enumerate(zip(info.get("clusterSizes", []), info.get("clusterCentres", []))):
            where = ", ".join(f"{v:.3g}" for v in centre)
            lines.append(f"Cluster {c + 1}: {size} particles, centre ({where}) in latent units"
                         f"{' (kept)' if c + 1 in info['clusters'] else ''}.")
        return lines

    def _methods(self) -> list[str]:
        info = self.getSelectionInfo()
        if info is None:
            return []
        return [f"From {info['n']} particles with {info['k']} latent coordinates, the {info['kept']} "
                f"{'outside' if info['invert'] else 'in'} {self._describeRegion(info)} were selected with "
                "flexplugin's latent subset protocol."]

    def _citations(self) -> list[str]:
        return []  # a plain selection; the runs that made the latents cite their methods

    # --------------------------- UTILS functions -----------------------------
    def getSelectionInfo(self) -> dict | None:
        """selection.json: n, kept, k, mode, units, invert and the region (ranges / clusters / centre, radius)."""
        return readJsonFile(self._getExtraPath(SELECTION_JSON))

    def getPlotFile(self) -> str:
        """The latent scatter with the kept particles highlighted (PNG)."""
        return self._getExtraPath(SELECTION_PNG)

    def getSelectionFile(self) -> str:
        """selection.csv: particle id, latents z1..zK, kept (0/1) and, for clusters, the cluster (from 1)."""
        return self._getExtraPath(SELECTION_CSV)

    def _getSelectionKey(self) -> str:
        """The settings that decide the selection (the step's argument)."""
        mode = self.mode.get()
        region = {MODE_BOX: [self.boxRanges.get()],
                  MODE_CLUSTERS: [self.numberOfClusters.get(), self.clusterIds.get(), self.seed.get()],
                  MODE_SPHERE: [self.centre.get(), self.radius.get()]}[mode]
        return json.dumps([MODES[mode], self.units.get(), self.invert.get(), region,
                           self._getInputParticles(pointer=True).getUniqueId()])

    @staticmethod
    def _readLatents(inputSet) -> tuple[np.ndarray, np.ndarray]:
        """Particle ids (N,) and latents (N, K) in id order; raises naming a particle with another K."""
        ids, rows = [], []
        for item in inputSet.iterItems(orderBy="id"):
            z = item.getZFlex()
            if rows and len(z) != len(rows[0]):
                raise ValueError(f"particle {item.getObjId()} has {len(z)} latents, the first has {len(rows[0])}")
            ids.append(int(item.getObjId()))
            rows.append(z)
        return np.array(ids, dtype=np.int64), np.array(rows, dtype=np.float64).reshape(len(ids), -1)

    def _select(self, z: np.ndarray) -> tuple[np.ndarray, dict]:
        """The particles in the region (before inverting) and a JSON description of the region."""
        mode, units = self.mode.get(), ls.UNITS[self.units.get()]
        info = {"mode": MODES[mode], "units": units, "invert": bool(self.invert.get())}
        if mode == MODE_BOX:
            ranges = ls.parse_box(self.boxRanges.get(), z.shape[1])
            info["ranges"] = {str(d + 1): [lo, hi] for d, (lo, hi) in sorted(ranges.items())}
            return ls.box_mask(z, ranges, units), info
        if mode == MODE_SPHERE:
            centre = ls.parse_point(self.centre.get(), z.shape[1])
            info.update(centre=centre.tolist(), radius=float(self.radius.get()))
            return ls.sphere_mask(z, centre, self.radius.get(), units), info
        c = self.numberOfClusters.get()
        labels, _ = ls.kmeans(z, c, seed=self.seed.get(), units=units)
        chosen = ls.parse_ids(self.clusterIds.get(), c)
        info.update(clusters=[i + 1 for i in chosen], numberOfClusters=c, seed=self.seed.get(),
                    labels=(labels + 1).tolist(),
                    clusterSizes=[int((labels == j).sum()) for j in range(c)],
                    clusterCentres=[z[labels == j].mean(0).tolist() for j in range(c)])  # in latent units
        return ls.cluster_mask(labels, chosen), info

    @staticmethod
    def _describeRegion(info: dict) -> str:
        units = "standard deviations" if info["units"] == "sd" else "latent units"
        if info["mode"] == "box":
            ranges = "; ".join(f"{d}: [{lo:g}, {hi:g}]" for d, (lo, hi) in info["ranges"].items())
            return f"the box {ranges} ({units})"
        if info["mode"] == "sphere":
            centre = ", ".join(f"{v:g}" for v in info["centre"])
            return f"the sphere of radius {info['radius']:g} around ({centre}) ({units})"
        return (f"k-means clusters {', '.join(str(c) for c in info['clusters'])} of {info['numberOfClusters']} "
                f"(seed {info['seed']}, {units})")

    def _writeSelection(self, ids: np.ndarray, z: np.ndarray, keep: np.ndarray, info: dict) -> None:
        """selection.csv (per particle, by id), selection.json (summary) and selection.png (plot)."""
        import pandas as pd
        table = pd.DataFrame({"rlnImageId": ids})
        for d in range(z.shape[1]):
            table[f"z{d + 1}"] = z[:, d]
        table["kept"] = keep.astype(int)
        labels = info.pop("labels", None)
        if labels is not None:
            table["cluster"] = labels
        table.to_csv(self.getSelectionFile(), index=False)
        with open(self._getExtraPath(SELECTION_JSON), "w") as fh:
            json.dump(info, fh, indent=1)
        centres = np.array(info["clusterCentres"]) if "clusterCentres" in info else None
        ls.plot_selection(z, keep, self.getPlotFile(), centres=centres,
                          title=f"{info['kept']} of {info['n']} particles kept")
