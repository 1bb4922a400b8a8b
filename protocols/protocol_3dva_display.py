"""3D variability display: volume series along the 3DVA components, or clusters of the reaction coordinates.

Mirrors cryoSPARC's "3D Variability Display" job (docs/algorithms.md §1.3) through `flexplugin 3dva-display`. The 3DVA
run is found through the FlexInfo of its SetOfParticlesFlex (runPath), so the input can be the 3D variability
analysis run itself or its output particles.
"""
from __future__ import annotations

import os
import re

import pyworkflow.object as pwobj
import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import SetOfClasses3D, SetOfParticlesFlex, SetOfVolumes, Volume
from pyworkflow.protocol import Protocol

from flexplugin.engine.latents import ID_LABEL
from flexplugin.engine.plots import plot_map_montage
from flexplugin.engine.va3d_config import DISPLAY_MODES, DisplayConfig

from .constants import VA3D_PROGNAME, VA3D_RUN_JSON
from .protocol_base import ButterworthFilterParams, FlexPluginProtBase, readJsonFile

__all__ = ["FlexPluginProt3DVADisplay", "INPUT_3DVA"]

INPUT_3DVA = "input3DVA"
MODES = list(DISPLAY_MODES)
D = DisplayConfig()  # every display default is declared there, once
MODE_SIMPLE, MODE_INTERMEDIATES, MODE_CLUSTER = 0, 1, 2
OUTPUT_COMPONENT = "outputComponent_{}"  # one SetOfVolumes per displayed component, numbered as in the 3DVA run
OUTPUT_CLASSES, OUTPUT_VOLUMES = "outputClasses", "outputVolumes"
COORDINATE_ATTR = "_flex3dvaCoordinate"  # on each frame volume: its coordinate along the component
FRAME_PARTICLES_ATTR = "_flex3dvaParticles"  # on each intermediate frame: the sum of its particles' weights
_SPLIT_RE = re.compile(r"[,;\s]+")


class FlexPluginProt3DVADisplay(FlexPluginProtBase, ButterworthFilterParams):
    """Displays a 3D variability analysis. Simple: for each component, a linear series of maps, the consensus plus
    t × the component, t spanning the particles' coordinates (one output set per component, to play as a movie).
    Intermediates: along each component, maps reconstructed from the particles themselves in a sliding window of
    coordinates, which shows non-linear changes. Cluster: k-means on the coordinates, one class per cluster with
    its particles and its reconstruction."""

    _label = "3D variability display"
    _possibleOutputs = {OUTPUT_COMPONENT.format(1): SetOfVolumes, OUTPUT_CLASSES: SetOfClasses3D,
                        OUTPUT_VOLUMES: SetOfVolumes}

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        self._defineGpuParams(form)
        notCluster, intermediates = f"mode != {MODE_CLUSTER}", f"mode == {MODE_INTERMEDIATES}"
        form.addSection(label="Input")
        form.addParam(INPUT_3DVA, params.PointerParam, pointerClass="FlexPluginProt3DVA,SetOfParticlesFlex",
                      important=True,
                      label="3D variability analysis",
                      help="A finished '3D variability analysis' run, or the particles it produced (a "
                           "SetOfParticlesFlex made by flexplugin's 3DVA: its FlexInfo points at the run's files).")
        form.addParam("mode", params.EnumParam, default=MODE_SIMPLE, choices=MODES,
                      display=params.EnumParam.DISPLAY_HLIST,
                      label="Output mode",
                      help="cryoSPARC: var_output_mode, default simple. Simple: per component, maps consensus + "
                           "t × component at evenly spaced t (always linear, fast, no particles read). "
                           "Intermediates: per component, maps reconstructed from the particles weighted by "
                           "their coordinate in a sliding window (captures non-linear change; one "
                           "reconstruction per frame). Cluster: k-means clusters of the coordinates, with a "
                           "particle subset and a reconstruction per cluster.")
        form.addParam("frames", params.IntParam, default=D.frames,
                      label="Number of frames/clusters",
                      help="Maps per component (simple, intermediates: at least 2) or number of clusters "
                           "(cluster: at least 1) (cryoSPARC: var_num_frames, default 20).")
        form.addParam("rangePercentile", params.FloatParam, default=D.range_percentile, condition=notCluster,
                      label="Range percentile (%)",
                      help="The frames span the coordinates from this percentile to 100 minus it, so outliers do "
                           "not stretch the series (cryoSPARC: var_range_percentile, default 3 %; from 0 to "
                           "below 50).")
        form.addParam("components", params.StringParam, default="",
                      label="Only use these components",
                      help="Components to display (or cluster on), numbered from 1, e.g. '1,3' (cryoSPARC: "
                           "var_component_filter). Empty: all.")
        form.addParam("width", params.FloatParam, default=D.width, condition=intermediates,
                      label="Intermediates: window width (frames)",
                      help="Width of the sliding window, in frames (cryoSPARC: var_intermediate_width, default "
                           "2). Above 0: triangular weights reaching zero this many frames away (2: each particle "
                           "contributes to about 4 frames). 0: top-hat, the particles within half a frame. -1: "
                           "equal-count bins of the sorted coordinates (no percentile clipping).")
        form.addParam("skipReconstruction", params.BooleanParam, default=D.skip_reconstruction,
                      condition=f"mode == {MODE_CLUSTER}",
                      label="Skip reconstruction?",
                      help="Cluster mode: make the particle classes only, without a reconstruction per cluster "
                           "(cryoSPARC: var_skip_reconstruction, default No).")

        form.addSection(label="Output volumes")
        self._defineButterworthParams(
            form, orderLabels=("Low-pass order", "High-pass order"),
            lowpassLabel="Low-pass resolution (Å)",
            lowpassHelp="Low-pass filter the output maps at this resolution in Å (Butterworth; cryoSPARC: "
                        "var_filter_res, default none). At least 2 × the output pixel size. Empty: no filter.",
            highpassLabel="High-pass resolution (Å)",
            highpassHelp="High-pass filter the output maps at this resolution in Å (cryoSPARC: var_highpass_res, "
                         "default none). Coarser (larger) than the low-pass resolution. Empty: no filter.")
        form.addParam("downsample", params.IntParam, default=None, allowsNull=True,
                      label="Downsample to box (px)",
                      help="Fourier-crop the output maps to this box in pixels (cryoSPARC: var_N); even, from 8 to "
                           "the 3DVA box. The pixel size grows by box / this. Reconstructions are done at this "
                           "box directly (faster). Empty: the 3DVA box.")
        form.addParam("crop", params.IntParam, default=None, allowsNull=True,
                      label="Crop to box (px)",
                      help="Crop the output maps to this box in pixels after downsampling (cryoSPARC: var_M); "
                           "even, from 4 to the (downsampled) box. The pixel size is unchanged. Empty: no crop.")
        form.addParam("flipHand", params.BooleanParam, default=D.flip_hand,
                      label="Flip hand?",
                      help="Mirror the output maps along z (cryoSPARC: var_vol_flip, default No); the particles "
                           "are unchanged.")
        form.addParam("batchSize", params.IntParam, default=D.batch_size, expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.GE(1, "Use at least one particle per batch")],
                      label="Batch size (particles)",
                      help="Images per batch in reconstructions (default 256); the result does not depend on it.")
        form.addParam("seed", params.IntParam, default=D.seed, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed",
                      help="Seed of k-means (cluster mode) and of the random half-set split of reconstructions "
                           "(default 0).")
        form.addParam("maxMemory", params.FloatParam, default=D.max_memory_gb, expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.Positive],
                      label="Memory for reconstructions (GB)",
                      help="Memory for the reconstruction accumulators in GB (default 2): maps that do not fit "
                           "are reconstructed in further passes over the particles.")
        form.addParallelSection(threads=4, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        args = self._getDisplayArgs()
        # simple mode only adds maps: it runs on the CPU and needs no GPU slot
        self._insertFunctionStep(self.displayStep, args, needsGPU=self._needsDevice())
        self._insertFunctionStep(self.createOutputStep, args, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def displayStep(self, args: list) -> None:
        """Run 3dva-display into extra/display (from scratch: a rerun replaces old maps)."""
        pwutils.cleanPath(self._getDisplayDir())
        self.runEngine("3dva-display", args)

    def createOutputStep(self, args: list) -> None:
        """Frames: one SetOfVolumes per component. Clusters: SetOfClasses3D (particles by id + map) and the maps.

        `args` are the display step's: a Scipion Continue that recomputes also redoes the outputs.
        """
        summary = self.getDisplaySummary()
        if self.mode.get() == MODE_CLUSTER:
            self._createClusterOutputs(summary)
        else:
            self._createSeriesOutputs(summary)

    def _createSeriesOutputs(self, summary: dict) -> None:
        """One SetOfVolumes per displayed component, its frames in order, each with its coordinate."""
        apix = float(summary["apix"])
        parts = self.get3DVAParticles()
        for series in self.getSeriesFiles():
            comp = summary["components"][series["index"]]
            coords = comp.get("t") or comp.get("frame_centres") or []
            counts = comp.get("frame_weight_sums")
            volumes = self._createSetOfVolumes(suffix=f"_component{series['component']}")
            volumes.setSamplingRate(apix)
            for f, fn in zip(series["frames"], series["volumes"]):
                vol = Volume()
                vol.setFileName(fn)
                vol.setSamplingRate(apix)
                vol.setObjLabel(f"component {series['component']} frame {f + 1}")
                if f < len(coords):
                    setattr(vol, COORDINATE_ATTR, pwobj.Float(float(coords[f])))
                if counts is not None:
                    setattr(vol, FRAME_PARTICLES_ATTR, pwobj.Float(float(counts[f])))
                volumes.append(vol)
            if series["volumes"]:
                plot_map_montage(series["volumes"], series["montage"], [f"frame {f + 1}" for f in series["frames"]],
                                 f"component {series['component']}: central z-slices")
            missing = len(coords) - len(series["volumes"])
            if missing > 0:
                self.info(f"Component {series['component']}: {missing} frame(s) had no particles in a half set and "
                          "were not reconstructed")
            name = OUTPUT_COMPONENT.format(series["component"])
            self._defineOutputs(**{name: volumes})
            self._defineSourceRelation(parts, volumes)

    def _createClusterOutputs(self, summary: dict) -> None:
        """Classes of the 3DVA particles by cluster (matched by id) with their maps, and the maps as a set."""
        import pandas as pd
        apix = float(summary["apix"])
        table = pd.read_csv(self._getDisplayDir("clusters.csv"))
        clusterOf = {int(i): int(c) for i, c in zip(table[ID_LABEL], table["cluster"])}
        maps = self.getClusterMapFiles()
        parts = self.get3DVAParticles()

        def setClass(item, row=None) -> None:
            c = clusterOf.get(int(item.getObjId()))
            if c is None:
                item._appendItem = False
            else:
                item.setClassId(c + 1)  # class ids start at 1 (0 means unclassified)

        def setRepresentative(cls) -> None:
            fn = maps.get(cls.getObjId() - 1)
            rep = cls.getRepresentative()
            rep.setSamplingRate(apix)
            if fn is not None:
                rep.setLocation(fn)
            cls.setObjLabel(f"cluster {cls.getObjId()}")

        classes = self._createSetOfClasses3D(parts)
        classes.classifyItems(updateItemCallback=setClass, updateClassCallback=setRepresentative,
                              iterParams={"orderBy": "id"})
        outs = {OUTPUT_CLASSES: classes}
        if maps:
            volumes = self._createSetOfVolumes(suffix="_clusters")
            volumes.setSamplingRate(apix)
            for c, fn in sorted(maps.items()):
                vol = Volume()
                vol.setFileName(fn)
                vol.setSamplingRate(apix)
                vol.setObjLabel(f"cluster {c + 1}")
                volumes.append(vol)
            outs[OUTPUT_VOLUMES] = volumes
            plot_map_montage([maps[c] for c in sorted(maps)], self.getClusterMontageFile(),
                             [f"cluster {c + 1}" for c in sorted(maps)], "cluster maps: central z-slices")
        self._defineOutputs(**outs)
        for obj in outs.values():
            self._defineSourceRelation(parts, obj)

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        if getattr(self, INPUT_3DVA).get() is None:
            return []  # the form check reports the missing input
        errors = self._validate3DVA()
        if errors:
            return errors
        k, box, apix, n = self.getK(), self._getRunBox(), self._getRunSamplingRate(), self.get3DVAParticles().getSize()
        mode = self.mode.get()
        frames = self.frames.get()
        if mode == MODE_CLUSTER:
            if frames is None or frames < 1 or frames > n:
                errors.append(f"The number of clusters must be between 1 and the number of particles ({n}).")
        elif frames is None or frames < 2:
            errors.append("Make at least 2 frames per component.")
        p = self.rangePercentile.get()
        if mode != MODE_CLUSTER and (p is None or not 0 <= p < 50):
            errors.append("The range percentile must be at least 0 and below 50.")
        comps = self._getComponents()
        if comps is None or (comps and (min(comps) < 1 or max(comps) > k or len(set(comps)) != len(comps))):
            errors.append(f"Components must be distinct numbers from 1 to {k}, e.g. '1,3'; got "
                          f"'{self.components.get()}'.")
        width = self.width.get()
        if mode == MODE_INTERMEDIATES and (width is None or (width < 0 and width != -1)):
            errors.append("The window width must be above 0 (triangular), 0 (top-hat) or -1 (equal-count bins).")
        down, crop = self.downsample.get(), self.crop.get()
        outBox = down or box
        if down is not None and (down % 2 or down < 8 or down > box):
            errors.append(f"The downsampled box must be even, from 8 to the 3DVA box ({box} px); got {down}.")
        if crop is not None and (crop % 2 or crop < 4 or crop > outBox):
            errors.append(f"The crop box must be even, from 4 to {outBox} px; got {crop}.")
        outApix = apix * box / outBox
        low, high = self.filterRes.get(), self.highpassRes.get()
        if low is not None and low < 2 * outApix - 1e-6:
            errors.append(f"The low-pass resolution ({low:g} Å) is finer than Nyquist of the output maps "
                          f"({2 * outApix:.3f} Å).")
        if high is not None and (high <= 0 or (low is not None and high <= low)):
            errors.append(f"The high-pass resolution ({high:g} Å) must be coarser (larger) than the low-pass "
                          "resolution.")
        errors += self._validateGpu()
        return errors

    def _validate3DVA(self) -> list[str]:
        """Errors for an input that is not a finished flexplugin 3D variability analysis."""
        parts = self.get3DVAParticles()
        if parts is None:
            return [f"{self.get3DVARunName()} has no output particles yet: wait until the analysis has finished."]
        prog = parts.getFlexInfo().getProgName()
        if prog != VA3D_PROGNAME:
            return [f"The input particles were made by '{prog or 'unknown'}', not by flexplugin's 3D variability "
                    "analysis: choose a '3D variability analysis' run or its output particles."]
        runDir = self.getRunDir()
        if not runDir or not os.path.exists(os.path.join(runDir, "run.json")):
            return [f"The 3D variability analysis files in {runDir} do not exist: did the run finish (or was it "
                    "deleted)?"]
        return []

    def _warnings(self) -> list[str]:
        parts = self.get3DVAParticles()
        info = self._getRunJson()
        if parts is not None and info is not None and self.mode.get() != MODE_SIMPLE \
                and parts.getSize() != info["n_particles"]:
            return [f"The input holds {parts.getSize()} of the {info['n_particles']} particles of the analysis: "
                    "clusters and maps are computed from all of them, the outputs keep the input's particles."]
        return []

    def _summary(self) -> list[str]:
        summary = self.getDisplaySummary()
        if summary is None or not list(self.iterOutputAttributes()):
            return ["Output not ready yet."]
        where = f"at a {summary['box']} px box ({summary['apix']:.3f} Å/px) from {self.get3DVARunName()}"
        if self.mode.get() == MODE_CLUSTER:
            sizes = [c["particles"] for c in summary["clusters"]]
            lines = [f"{len(sizes)} clusters of {', '.join(str(s) for s in sizes)} particles {where}."]
            res = [c.get("resolution_0143_A") for c in summary["clusters"]]
            if any(r is not None for r in res):
                lines.append("Cluster map resolutions (FSC 0.143): " +
                             ", ".join("-" if r is None else f"{r:.1f} Å" for r in res) + ".")
            return lines
        series = self.getSeriesFiles()
        kind = "linear" if self.mode.get() == MODE_SIMPLE else "reconstructed intermediate"
        counts = ", ".join(f"component {s['component']}: {len(s['volumes'])} maps" for s in series)
        return [f"{len(series)} {kind} series ({counts}) {where}."]

    def _methods(self) -> list[str]:
        summary = self.getDisplaySummary()
        if summary is None:
            return []
        how = {MODE_SIMPLE: f"series of {self.frames.get()} maps along each component (consensus plus a multiple of "
                            "the component, between percentiles "
                            f"{self.rangePercentile.get():g} and {100 - self.rangePercentile.get():g} of the "
                            "coordinates) were",
               MODE_INTERMEDIATES: f"series of {self.frames.get()} maps along each component were reconstructed from "
                                   f"the particles in a sliding window of width {self.width.get():g} frames and",
               MODE_CLUSTER: f"the coordinates were clustered by k-means into {self.frames.get()} clusters, whose "
                             "maps were reconstructed and"}[self.mode.get()]
        return [f"From the 3D variability analysis [Punjani2021] made with flexplugin, {how} generated at a "
                f"{summary['box']} px box ({summary['apix']:.3f} Å/px)."]

    def _citations(self) -> list[str]:
        return ["Punjani2021"]

    # --------------------------- UTILS functions -----------------------------
    def get3DVAParticles(self) -> SetOfParticlesFlex | None:
        """The 3DVA's particles with coordinates (None before the analysis has finished)."""
        obj = getattr(self, INPUT_3DVA).get()
        if isinstance(obj, Protocol):  # the form only admits a 3D variability analysis run here
            return getattr(obj, "outputParticles", None)
        return obj if isinstance(obj, SetOfParticlesFlex) else None

    def get3DVARunName(self) -> str:
        """The name of the run given as input, or that produced the particles given, for summaries."""
        ptr = getattr(self, INPUT_3DVA)
        owner = ptr.getObjValue()
        if isinstance(owner, Protocol):
            return owner.getRunName() + (f" ({ptr.getExtended()})" if ptr.hasExtended() else "")
        obj = ptr.get()
        return (obj.getObjLabel() or "the input particles") if obj is not None else "?"

    def getRunDir(self) -> str | None:
        """The 3DVA engine folder (project-relative), from the particles' FlexInfo."""
        parts = self.get3DVAParticles()
        info = parts.getFlexInfo() if parts is not None else None
        return info.getAttr("runPath") if info is not None and hasattr(info, "runPath") else None

    def getK(self) -> int:
        """Number of components of the 3DVA run."""
        return int(self.get3DVAParticles().getFlexInfo().getAttr("K"))

    def _getRunBox(self) -> int:
        return int(self.get3DVAParticles().getFlexInfo().getAttr("box"))

    def _getRunSamplingRate(self) -> float:
        return float(self.get3DVAParticles().getFlexInfo().getAttr("samplingRate"))

    def _getRunJson(self) -> dict | None:
        runDir = self.getRunDir()
        return readJsonFile(os.path.join(runDir, VA3D_RUN_JSON)) if runDir else None

    def _getComponents(self) -> list[int] | None:
        """The 1-based components from the form ([] = all); None when unreadable."""
        words = [w for w in _SPLIT_RE.split((self.components.get() or "").strip()) if w]
        return [int(w) for w in words] if all(w.isdigit() for w in words) else None

    def _needsDevice(self) -> bool:
        """Whether the engine job reconstructs (intermediates, cluster with reconstruction) and so uses the GPU."""
        mode = self.mode.get()
        return mode == MODE_INTERMEDIATES or (mode == MODE_CLUSTER and not self.skipReconstruction.get())

    def _getDisplayDir(self, *paths: str) -> str:
        return os.path.normpath(self._getExtraPath("display", *paths))

    def _getDisplayArgs(self) -> list:
        """The `flexplugin 3dva-display` argument list built from the form."""
        mode = self.mode.get()
        args = ["--run", self.getRunDir(), "--out", self._getDisplayDir(),
                "--mode", MODES[mode],
                "--frames", self.frames.get()]
        if mode != MODE_CLUSTER:
            args += ["--range-percentile", self.rangePercentile.get()]
        comps = self._getComponents()
        if comps:
            args += ["--components", ",".join(str(c - 1) for c in comps)]
        if self.filterRes.get() is not None:
            args += ["--filter-res", self.filterRes.get(), "--filter-order", self.filterOrder.get()]
        if self.highpassRes.get() is not None:
            args += ["--highpass-res", self.highpassRes.get(), "--highpass-order", self.highpassOrder.get()]
        if self.downsample.get() is not None:
            args += ["--downsample", self.downsample.get()]
        if self.crop.get() is not None:
            args += ["--crop", self.crop.get()]
        if self.flipHand.get():
            args += ["--flip-hand"]
        if mode == MODE_INTERMEDIATES:
            args += ["--width", self.width.get()]
        if mode == MODE_CLUSTER and self.skipReconstruction.get():
            args += ["--skip-reconstruction"]
        args += ["--batch-size", self.batchSize.get(), "--seed", self.seed.get(),
                 "--max-memory-gb", self.maxMemory.get()]
        device = self.getDeviceArgs() if self._needsDevice() else ["--device", "cpu"]
        return args + device + ["--threads", max(1, self.numberOfThreads.get() or 1)]

    def getDisplaySummary(self) -> dict | None:
        """3dva-display's summary.json (mode, components, apix, box, files, clusters) or None."""
        return readJsonFile(self._getDisplayDir("summary.json"))

    def getSeriesFiles(self) -> list[dict]:
        """Per displayed component: {'index' (output order), 'component' (1-based, as in the 3DVA run), 'frames'
        (0-based frame numbers with a map), 'volumes' (MRC paths in frame order), 'montage' (PNG)}."""
        summary = self.getDisplaySummary()
        if summary is None or summary["mode"] == "cluster":
            return []
        series = []
        for comp in summary["components"]:
            j = comp["output_index"]
            pattern = re.compile(rf"component_{j:03d}/frame_(\d+)\.mrc$")
            frames = sorted(int(m.group(1)) for m in map(pattern.match, summary["files"]) if m)
            series.append({"index": j, "component": comp["source_component"] + 1, "frames": frames,
                           "volumes": [self._getDisplayDir(f"component_{j:03d}", f"frame_{f:03d}.mrc") for f in frames],
                           "montage": self._getDisplayDir(f"component_{j:03d}.png")})
        return series

    def getClusterMapFiles(self) -> dict[int, str]:
        """{cluster (0-based): its map} for the clusters that were reconstructed."""
        summary = self.getDisplaySummary()
        if summary is None or summary["mode"] != "cluster":
            return {}
        pattern = re.compile(r"cluster_(\d+)\.mrc$")
        return {int(m.group(1)): self._getDisplayDir(m.group(0)) for m in map(pattern.match, summary["files"]) if m}

    def getClusterMontageFile(self) -> str:
        """Central slices of the cluster maps (PNG)."""
        return self._getDisplayDir("cluster_maps.png")

    def getPlotFiles(self) -> dict[str, str]:
        """The engine's plots: clusters (cluster mode, coordinates coloured by cluster), frame_counts
        (intermediates, particles per frame)."""
        return {"clusters": self._getDisplayDir("clusters.png"),
                "frame_counts": self._getDisplayDir("frame_counts.png")}
