"""3D Flex generate: volumes of a trained 3D Flex model along its latent axes, at given points, or at the mean
latent of some particles, plus the latent atlas.

Mirrors cryoSPARC's "3D Flex Generator" (docs/algorithms.md §2.5) through `flexplugin flex-generate`. The model is
found through the FlexInfo of the training's SetOfParticlesFlex (modelPath), so the input can be the training
run itself or its output particles (protocol_base.FlexModelInput, shared with 3D flex reconstruction).
"""
from __future__ import annotations

import os
import re
from enum import Enum

import numpy as np

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import FlexInfo, SetOfVolumesFlex, VolumeFlex
from pwem.protocols import ProtFlexBase

from flexplugin.convert import plainFileName
from flexplugin.engine.flex.generate_config import GenerateConfig

from .constants import FLEX_PROGNAME, INPUT_TRAINING
from .protocol_base import FlexModelInput, FlexPluginProtBase, readJsonFile

__all__ = ["FlexPluginProtGenerate", "parseLatentPoints"]

G = GenerateConfig()  # every generator default is declared there, once
MODE_AXES, MODE_POINTS, MODE_PARTICLES = 0, 1, 2
BOX_TRAIN, BOX_FULL = 0, 1
OUTPUT_SERIES = "outputVolumes_{}"  # one set per latent axis, numbered from 1
OUTPUT_POINTS = "outputVolumes"  # custom points or particle mean: one set
_SPLIT_RE = re.compile(r"[,;\s]+")


def parseLatentPoints(text: str) -> list[list[float]]:
    """Latent points from text: one point per line, values separated by commas (or spaces); blank lines and
    lines starting with '#' are skipped. Raises ValueError on a word that is not a finite number."""
    points = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        row = []
        for word in (w for w in _SPLIT_RE.split(line) if w):
            try:
                value = float(word)
            except ValueError:
                raise ValueError(f"line {n}: '{word}' is not a number") from None
            if not np.isfinite(value):
                raise ValueError(f"line {n}: '{word}' is not a finite number")
            row.append(value)
        points.append(row)
    return points


class outputs(Enum):
    outputVolumes = SetOfVolumesFlex  # custom points / particle mean; axis series are outputVolumes_1..K


class FlexPluginProtGenerate(ProtFlexBase, FlexPluginProtBase, FlexModelInput):
    """Generates volumes from a trained 3D Flex model: the canonical map deformed by the flow decoded at latent
    points. Three modes: a series along each latent axis over the range the particles occupy (one output set
    per axis, outputVolumes_1 .. outputVolumes_K, so each can be played as a movie), custom latent points, or
    the mean latent of a subset of the particles (one set, outputVolumes). Each VolumeFlex carries the latent
    point it was made at (zFlex). Also draws the latent atlas: volumes on a grid over two latent axes."""

    _label = "3D flex generate"
    _possibleOutputs = outputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        self._defineGpuParams(form)
        form.addSection(label="Input")
        self._defineTrainingParam(form)
        form.addParam("mode", params.EnumParam, default=MODE_AXES,
                      choices=["latent axes", "custom points", "mean of particles"],
                      display=params.EnumParam.DISPLAY_HLIST,
                      label="Generate at",
                      help="Latent axes: a series of volumes along each latent axis over the range of the particles' "
                           "latents, the other coordinates at their median (cryoSPARC: flex_gen_num_pts). Custom "
                           "points: one volume per latent point given below. Mean of particles: one volume at the "
                           "mean latent of a subset of the training particles (e.g. a class or a selection).")
        form.addParam("frames", params.IntParam, default=G.frames, condition=f"mode == {MODE_AXES}",
                      validators=[params.GE(2, "Generate at least 2 volumes per axis")],
                      label="Volumes per axis",
                      help="Number of volumes in each latent axis series (cryoSPARC: flex_gen_num_pts, default 41). "
                           "An odd number puts the centre of the range in the middle frame.")
        form.addParam("percentile", params.FloatParam, default=G.percentile, condition=f"mode == {MODE_AXES}",
                      validators=[params.Range(0, 49.9, "The percentile must be between 0 and 49.9")],
                      label="Range percentile (%)",
                      help="Each axis series spans the particles' latents from this percentile to 100 minus it "
                           "(default 1 %: the 1st to the 99th percentile), so outliers do not stretch the range.")
        form.addParam("latentPoints", params.TextParam, default="", condition=f"mode == {MODE_POINTS}",
                      label="Latent points",
                      help="One point per line, K comma-separated values (K = the model's latent dimensions), e.g. "
                           "'-1.0, 0.0' and '1.0, 0.0' on two lines for K = 2. Latents of 3D flex training mostly "
                           "lie within (-1.5, 1.5). Lines starting with '#' are ignored. Leave empty to read the "
                           "points from a file instead.")
        form.addParam("pointsFile", params.FileParam, default="", condition=f"mode == {MODE_POINTS}",
                      label="Latent points file",
                      help="A text file with the points in the same format (one point per line, K comma-separated "
                           "values, no header). Used only when the text box above is empty.")
        form.addParam("inputSubset", params.PointerParam, pointerClass="SetOfParticles", allowsNull=True,
                      condition=f"mode == {MODE_PARTICLES}",
                      label="Particles",
                      help="Particles of the training (e.g. a subset or a class), matched by id: one volume is made "
                           "at the mean of their latents.")

        form.addSection(label="Output")
        form.addParam("outputBox", params.EnumParam, default=BOX_TRAIN, choices=["training box", "full box"],
                      display=params.EnumParam.DISPLAY_HLIST,
                      label="Output box",
                      help="Training box: volumes at the training box and pixel size (fast). Full box: at the crop "
                           "box of the training (the particles' box unless training cropped them), pixel size = "
                           "training pixel size × training box / crop box; the canonical map is Fourier-padded "
                           "and the flow recomputed on the finer grid.")
        form.addParam("inputMap", params.PointerParam, pointerClass="Volume", allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Map to deform (optional)",
                      help="Deform this map instead of the training's canonical map, e.g. the flex map of '3D flex "
                           "reconstruction' with the full output box. Its box and pixel size must be those of the "
                           "output box. Empty: the canonical map.")
        form.addParam("doAtlas", params.BooleanParam, default=G.atlas,
                      label="Draw the latent atlas?",
                      help="A figure of volumes (projected along z) on a grid over two latent axes, drawn over the "
                           "particles' latent density (default Yes).")
        form.addParam("atlasAxes", params.StringParam, default="", condition="doAtlas",
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Atlas axes",
                      help="The two latent axes of the atlas, numbered from 1, e.g. '1,3'. Empty: axes 1 and 2 (axis "
                           "1 twice for a 1-dimensional model).")
        form.addParam("atlasGrid", params.IntParam, default=G.atlas_grid, condition="doAtlas",
                      validators=[params.GE(2, "The atlas needs at least 2 points per axis")],
                      label="Atlas grid size",
                      help="Volumes per atlas axis (default 7: a 7×7 grid over the 1st to 99th percentiles).")
        form.addParallelSection(threads=4, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        mode = self.mode.get()
        if mode == MODE_POINTS:
            self._insertFunctionStep(self.writePointsStep, self._getPoints(), needsGPU=False)
        elif mode == MODE_PARTICLES:
            self._insertFunctionStep(self.writeParticleIdsStep, self.inputSubset.get().getObjId(), needsGPU=False)
        args = self._getGenerateArgs()
        self._insertFunctionStep(self.generateStep, args, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, args, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def writePointsStep(self, points: list) -> None:
        """Write the custom latent points as the engine's CSV (no header, K values per row)."""
        path = self._getPointsFile()
        pwutils.makePath(os.path.dirname(path))
        np.savetxt(path, np.asarray(points, dtype=np.float64), delimiter=",", fmt="%.8g")
        self.info(f"Wrote {len(points)} latent points to {path}")

    def writeParticleIdsStep(self, subsetId: int) -> None:
        """Write the ids of the chosen particles, one per line, for the engine's --from-particles."""
        ids = sorted(self.inputSubset.get().getIdSet())
        path = self._getIdsFile()
        pwutils.makePath(os.path.dirname(path))
        np.savetxt(path, np.asarray(ids, dtype=np.int64), fmt="%d")
        self.info(f"Wrote {len(ids)} particle ids to {path}")

    def generateStep(self, args: list) -> None:
        """Run flex-generate into extra/generate (from scratch: a rerun replaces old volumes)."""
        pwutils.cleanPath(self._getGenerateDir())
        self.runEngine("flex-generate", args)

    def createOutputStep(self, args: list) -> None:
        """One SetOfVolumesFlex per series, each VolumeFlex with its latent point (read from points.csv in order).

        `args` are the generation step's: a Scipion Continue that regenerates also redoes the outputs.
        """
        info = self.getGenerateInfo()
        apix = float(info["apix"])
        trainInfo = self.getTrainingFlexInfo()
        trainParts = self.getTrainingParticles()
        for k, series in enumerate(info["series"]):
            folder = self._getGenerateDir(series["folder"])
            axis = self.mode.get() == MODE_AXES
            suffix = f"_{k + 1}" if axis else ""
            volumes = self._createSetOfVolumesFlex(suffix=suffix, progName=FLEX_PROGNAME)
            volumes.setSamplingRate(apix)
            flexInfo = FlexInfo(FLEX_PROGNAME)
            flexInfo.copyInfo(trainInfo)
            flexInfo.setAttr("series", self._seriesLabel(k))
            flexInfo.setAttr("generatedBox", int(info["box"]))
            volumes.setFlexInfo(flexInfo)
            for name, point in self._readPoints(os.path.join(folder, "points.csv")):
                vol = VolumeFlex(progName=FLEX_PROGNAME)
                vol.setFileName(os.path.join(folder, name))
                vol.setSamplingRate(apix)
                vol.setZFlex(point)
                volumes.append(vol)
            outName = OUTPUT_SERIES.format(k + 1) if axis else OUTPUT_POINTS
            self._defineOutputs(**{outName: volumes})
            self._defineSourceRelation(trainParts, volumes)

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        if getattr(self, INPUT_TRAINING).get() is None:
            return []  # the form check reports the missing input
        errors = self._validateTraining()
        if errors:
            return errors
        k = self.getLatentDim()
        mode = self.mode.get()
        if mode == MODE_POINTS:
            errors += self._validatePoints(k)
        elif mode == MODE_PARTICLES:
            errors += self._validateSubset()
        if self.doAtlas.get():
            axes = self._getAtlasAxes()
            if axes is None or (axes and (len(axes) != 2 or min(axes) < 1 or max(axes) > k or axes[0] == axes[1])):
                errors.append(f"Atlas axes must be two different latent axes from 1 to {k}, e.g. '1,2'; got "
                              f"'{self.atlasAxes.get()}'.")
        errors += self._validateMap()
        errors += self._validateGpu()
        return errors

    def _validatePoints(self, k: int) -> list[str]:
        """Errors for custom points: missing, unreadable, or not K values per row."""
        text, fileName = (self.latentPoints.get() or "").strip(), (self.pointsFile.get() or "").strip()
        if not text and not fileName:
            return ["Give the latent points, in the text box or as a file."]
        if not text and not os.path.exists(fileName):
            return [f"The latent points file {fileName} does not exist."]
        try:
            points = self._getPoints()
        except ValueError as e:
            return [f"Cannot read the latent points: {e}."]
        if not points:
            return ["No latent points given: write one point per line."]
        bad = [i + 1 for i, p in enumerate(points) if len(p) != k]
        if bad:
            return [f"Each latent point needs {k} values (the model has {k} latent dimensions); point(s) "
                    f"{', '.join(str(b) for b in bad[:5])} have {len(points[bad[0] - 1])}."]
        return []

    def _validateSubset(self) -> list[str]:
        """Errors for a particle subset that is missing, empty or not part of the training."""
        subset = self.inputSubset.get()
        if subset is None:
            return ["Choose the particles whose mean latent to generate at."]
        if subset.getSize() == 0:
            return ["The chosen particle set is empty."]
        extra = subset.getIdSet() - self.getTrainingParticles().getIdSet()
        if extra:
            return [f"{len(extra)} of the chosen particles (e.g. id {min(extra)}) are not in the training: choose "
                    "particles of the training (a subset of its particles, matched by id)."]
        return []

    def _validateMap(self) -> list[str]:
        """Errors for a map to deform whose box or pixel size is not the output box's."""
        vol = self.inputMap.get()
        if vol is None:
            return []
        dim = vol.getDim()
        if dim is None:
            return [f"Cannot read the map file {vol.getFileName()}."]
        box, apix = self._getOutputBoxSize(), self._getOutputSamplingRate()
        errors = []
        if len(set(dim)) != 1 or dim[0] != box:
            errors.append(f"The map to deform is {dim[0]}x{dim[1]}x{dim[2]} but the output box is {box} px: choose "
                          "the other output box or resize the map.")
        vapix = vol.getSamplingRate()
        if vapix and abs(vapix - apix) > 1e-3 * apix:
            errors.append(f"The map to deform has pixel size {vapix:.4f} Å but the output box needs {apix:.4f} Å.")
        return errors

    def _summary(self) -> list[str]:
        info = self.getGenerateInfo()
        if info is None or not list(self._iterVolumeSets()):
            return ["Output not ready yet."]
        counts = [len(s["volumes"]) for s in info["series"]]
        where = {MODE_AXES: f"{len(counts)} latent axis series of {counts[0]} volumes",
                 MODE_POINTS: f"{counts[0]} volumes at the given latent points",
                 MODE_PARTICLES: "1 volume at the mean latent of "
                                 f"{self.inputSubset.get().getSize() if self.inputSubset.get() else '?'} particles"}
        lines = [f"Generated {where[self.mode.get()]} at a {info['box']} px box ({info['apix']:.3f} Å/px) from "
                 f"{self.getTrainingRunName()}."]
        if info.get("atlas"):
            lines.append("Latent atlas drawn (see the viewer).")
        return lines

    def _methods(self) -> list[str]:
        info = self.getGenerateInfo()
        if info is None:
            return []
        p = self.percentile.get()
        how = {MODE_AXES: f"series of {self.frames.get()} volumes along each latent axis (between percentiles {p:g} "
                          f"and {100 - p:g} of the particles' latents) were",
               MODE_POINTS: "volumes at chosen latent points were",
               MODE_PARTICLES: "a volume at the mean latent of a subset of the particles was"}[self.mode.get()]
        return [f"Using the 3D Flex [Punjani2023] model trained with flexplugin, {how} generated by deforming the "
                f"canonical map with the decoded flow, at a {info['box']} px box ({info['apix']:.3f} Å/px)."]

    def _citations(self) -> list[str]:
        return ["Punjani2023"]

    # --------------------------- UTILS functions -----------------------------
    def _getGenerateDir(self, *paths: str) -> str:
        return os.path.normpath(self._getExtraPath("generate", *paths))

    def _getPointsFile(self) -> str:
        return self._getExtraPath("input", "points.csv")

    def _getIdsFile(self) -> str:
        return self._getExtraPath("input", "particle_ids.txt")

    def _getPoints(self) -> list[list[float]]:
        """The custom latent points from the text box, or from the file when the text is empty."""
        text = (self.latentPoints.get() or "").strip()
        if not text:
            with open(self.pointsFile.get().strip()) as fh:
                text = fh.read()
        return parseLatentPoints(text)

    def _getAtlasAxes(self) -> list[int] | None:
        """The 1-based atlas axes from the form ([] = the engine's default); None when unreadable."""
        words = [w for w in _SPLIT_RE.split((self.atlasAxes.get() or "").strip()) if w]
        return [int(w) for w in words] if all(w.isdigit() for w in words) else None

    def _getOutputBoxSize(self) -> int:
        """Box (px) of the generated volumes."""
        info = self.getTrainingFlexInfo()
        return int(info.getAttr("cropBox" if self.outputBox.get() == BOX_FULL else "trainingBox"))

    def _getOutputSamplingRate(self) -> float:
        """Pixel size (Å) of the generated volumes: training pixel size × training box / output box."""
        info = self.getTrainingFlexInfo()
        return float(info.getAttr("trainingSamplingRate")) * int(info.getAttr("trainingBox")) / self._getOutputBoxSize()

    def _getGenerateArgs(self) -> list:
        """The `flexplugin flex-generate` argument list built from the form."""
        args = ["--model", self.getModelPath(), "--out", self._getGenerateDir(),
                "--box", "full" if self.outputBox.get() == BOX_FULL else "train"]
        mode = self.mode.get()
        if mode == MODE_AXES:
            args += ["--frames", self.frames.get(), "--percentile", self.percentile.get()]
        elif mode == MODE_POINTS:
            args += ["--points", self._getPointsFile()]
        else:
            args += ["--from-particles", self._getIdsFile()]
        if self.inputMap.get() is not None:
            args += ["--map", plainFileName(self.inputMap.get().getFileName())]
        if self.doAtlas.get():
            axes = self._getAtlasAxes()
            if axes:
                args += ["--atlas-axes", ",".join(str(a - 1) for a in axes)]
            args += ["--atlas-grid", self.atlasGrid.get()]
        else:
            args += ["--no-atlas"]
        return args + self.getDeviceArgs() + ["--threads", max(1, self.numberOfThreads.get() or 1)]

    @staticmethod
    def _readPoints(path: str) -> list[tuple[str, list[float]]]:
        """(volume file name, latent point) per row of the engine's points.csv, in file order."""
        import pandas as pd
        table = pd.read_csv(path)
        columns = [c for c in table.columns if c != "volume"]
        return [(str(name), [float(v) for v in row])
                for name, row in zip(table["volume"], table[columns].itertuples(index=False))]

    def getGenerateInfo(self) -> dict | None:
        """flex-generate's generate.json (box, apix, series [{name, folder, volumes}], atlas) or None."""
        return readJsonFile(self._getGenerateDir("generate.json"))

    def _iterVolumeSets(self):
        """(output name, SetOfVolumesFlex) of this run, axis series in order."""
        yield from self.iterOutputAttributes(SetOfVolumesFlex)

    def _seriesLabel(self, k: int) -> str:
        """How series k is named to the user (axes numbered from 1, as in the form; the engine counts from 0)."""
        return {MODE_AXES: f"latent axis {k + 1}", MODE_POINTS: "custom points",
                MODE_PARTICLES: "mean of particles"}[self.mode.get()]

    def getAtlasFile(self) -> str:
        """atlas.png: volumes on a latent grid over the particles' latent density."""
        return self._getGenerateDir("atlas.png")

    def getSeriesFiles(self) -> list[dict]:
        """Per series: {'name', 'montage' (PNG of central slices), 'volumes' (MRC paths in order)}."""
        info = self.getGenerateInfo()
        if info is None:
            return []
        files = []
        for series in info["series"]:
            folder = series["folder"]
            montage = "series.png" if folder == "." else f"{folder}.png"
            files.append({"name": self._seriesLabel(len(files)), "montage": self._getGenerateDir(montage),
                          "volumes": [self._getGenerateDir(folder, v) for v in series["volumes"]]})
        return files

