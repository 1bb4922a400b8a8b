"""3D Flex reconstruction: the canonical map at full resolution with the learned motion undone, per half set.

Mirrors cryoSPARC's "3D Flex Reconstruction" (docs/algorithms.md §2.4) through `flexplugin flex-reconstruct`: with the
latents and the flow generator of a 3D flex training frozen, each half map at the crop box is solved by conjugate
gradients on latent-binned Fourier accumulators, preconditioned by the Wiener denominator and started from its Wiener
map; the rigid ("noflex") solution of the same problem, the Wiener map, is the baseline. Outputs both maps with their half maps
and the two half-map FSCs, the masked FSCs corrected by phase randomisation, local-resolution maps of both and the
local resolution gain (noflex − flex, Å), the view of where undoing the motion helped (docs/resolution.md).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

import pyworkflow.object as pwobj
import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import FSC, SetOfFSCs, Volume
from pyworkflow.protocol import Protocol

from flexplugin.convert import plainFileName
from flexplugin.engine.flex.reconstruct_config import ReconstructConfig

from .constants import INPUT_TRAINING
from .protocol_base import INPUT_MASK, INPUT_PARTICLES, FlexModelInput, FlexPluginProtBase, engineArgs

R = ReconstructConfig()  # every reconstruction default is declared there, once
# the form parameter of each ReconstructConfig field
RECONSTRUCT_FORM = {"iterations": "iterations", "tol": "tolerance", "reg": "regularisation", "bins": "latentBins",
                    "flow_tol": "flowTolerance", "max_bins": "maxBins", "flow_noise": "flowNoise", "noflex": "doNoflex",
                    "batch_size": "batchSize", "seed": "seed"}

__all__ = ["FlexPluginProtReconstruct"]

# what flex-reconstruct writes into its --out folder
MAP_FILES = {"flex": ("flex_map.mrc", "flex_half_A.mrc", "flex_half_B.mrc"),
             "noflex": ("noflex_map.mrc", "noflex_half_A.mrc", "noflex_half_B.mrc")}
FSC_LABELS = {"flex": "3D flex", "noflex": "noflex (rigid)"}
CORRECTED_LABEL = "{} (masked, corrected by phase randomisation)"
# what engine/resolution.write_resolution_outputs writes there
LOCRES_FILES = {"flex": "locres_flex.mrc", "noflex": "locres_noflex.mrc", "gain": "locres_gain.mrc"}


# output names (two outputs share a class, so the possible outputs are a dict, not an Enum)
OUTPUT_FLEX, OUTPUT_NOFLEX, OUTPUT_FSCS = "outputVolumeFlex", "outputVolumeNoflex", "outputFSCs"
OUTPUT_MAPS = {"flex": OUTPUT_FLEX, "noflex": OUTPUT_NOFLEX}
OUTPUT_LOCRES_FLEX, OUTPUT_LOCRES_NOFLEX, OUTPUT_GAIN = ("outputLocalResolutionFlex", "outputLocalResolutionNoflex",
                                                         "outputLocalResolutionGain")
OUTPUT_LOCRES = {"flex": OUTPUT_LOCRES_FLEX, "noflex": OUTPUT_LOCRES_NOFLEX, "gain": OUTPUT_GAIN}


class FlexPluginProtReconstruct(FlexPluginProtBase, FlexModelInput):
    """Reconstructs the canonical map of a 3D Flex model at the full (crop) box from the particles, undoing each
    particle's motion: with the trained latents and flow generator fixed, each half map is the least-squares fit
    of the deformed, projected map to its half of the particles, with the Wiener map's per-shell regularisation
    (conjugate gradients from its Wiener map, the particles grouped into latent bins). The rigid solution of the
    same problem (noflex, the Wiener map) shows what modelling the motion gained. Outputs the flex and
    noflex maps with their half maps, both half-map FSCs (with a mask also corrected by phase randomisation, as
    RELION's post-processing), local-resolution maps of both (Å) and the local resolution gain, noflex − flex (Å):
    positive where undoing the motion sharpened the map."""

    _label = "3D flex reconstruction"
    _possibleOutputs = {OUTPUT_FLEX: Volume, OUTPUT_NOFLEX: Volume, OUTPUT_FSCS: SetOfFSCs,
                        OUTPUT_LOCRES_FLEX: Volume, OUTPUT_LOCRES_NOFLEX: Volume, OUTPUT_GAIN: Volume}

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        self._defineGpuParams(form)
        form.addSection(label="Input")
        self._defineTrainingParam(form)
        form.addParam(INPUT_PARTICLES, params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", allowsNull=True,
                      label="Particles (optional)",
                      help="The particles to reconstruct from: the training's particles or a subset of them (matched "
                           "by id; their latents come from the training), with the training's box and pixel size. "
                           "Empty: all the training's particles. Half sets follow the particles' RELION random "
                           "subsets when every particle has one, else a seeded random split.")
        self._defineMaskParam(form, label="Mask for the FSC (optional)",
                              help="A soft mask (values in [0, 1]) applied to both half maps before the FSC, at the "
                                   "particles' box or at the training's crop box, with the particles' pixel size. "
                                   "The masked FSC is corrected by phase randomisation (RELION's post-processing), "
                                   "and the local resolution and its gain are measured where the mask is > 0.5: a "
                                   "mask around the moving region shows what the motion correction gained there. "
                                   "Empty: unmasked FSC, local resolution inside an automatic mask around the "
                                   "density.")

        form.addSection(label="Reconstruction")
        form.addParam("iterations", params.IntParam, default=R.iterations,
                      validators=[params.GE(1, "Use at least one iteration")],
                      label="Most CG iterations",
                      help="Most preconditioned conjugate-gradient iterations per half map (cf. cryoSPARC's "
                           f"flex_bfgs_num_iters, default {R.iterations}). The solver usually stops earlier, when its "
                           "residual "
                           "falls below the tolerance (advanced).")
        form.addParam("doNoflex", params.BooleanParam, default=R.noflex,
                      label="Also reconstruct without flex?",
                      help="Also solve the rigid reconstruction (no motion) with the same solver, which gives the "
                           "Wiener map, as the baseline of the FSC and of the local resolution gain (cryoSPARC: "
                           "flex_do_noflex_recon). Without it there is no gain map.")
        form.addParam("regularisation", params.FloatParam, default=None, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Regularisation scale",
                      help="Scale of the per-shell regularisation derived from the half-map FSC, as in the Wiener "
                           f"map (dimensionless). Empty: {R.reg:g}. Above 1 smooths more; raise it if the maps are "
                           "noisy at "
                           "high frequency.")
        form.addParam("tolerance", params.FloatParam, default=R.tol, expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.GT(0), params.LT(1)],
                      label="CG tolerance",
                      help="Stop a half map's conjugate gradients when the preconditioned residual is below this "
                           f"fraction of the right-hand side's (default {R.tol:g}).")
        form.addParam("latentBins", params.IntParam, default=None, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Latent bins",
                      help="Number of latent bins (k-means groups of particles that share one deformation). Empty: "
                           "chosen so that the flow varies by less than the flow tolerance within a bin. More bins "
                           "are more exact and slower.")
        form.addParam("flowTolerance", params.FloatParam, default=R.flow_tol, expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.GT(0)],
                      label="Flow tolerance (voxels)",
                      help="When the number of bins is chosen automatically: the largest spread of the flow within a "
                           "latent bin, in voxels of the crop box, for 95 % of the particles (default "
                           f"{R.flow_tol:g}).")
        form.addParam("maxBins", params.IntParam, default=R.max_bins, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Most latent bins",
                      help=f"When the number of bins is chosen automatically: the cap on it (default {R.max_bins}). "
                           "Each bin holds two Fourier accumulators per half set (6.4 MB at a crop box of 64, 51 MB "
                           "at 128, about 400 MB at 256): lower it where memory is short, raise it when the log warns "
                           "that the flow tolerance is not met.")
        form.addParam("flowNoise", params.FloatParam, default=R.flow_noise, expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.GE(0)],
                      label="Flow noise (training voxels)",
                      help="The noise level of the trained flows, in voxels of the training box (where the flow "
                           "generator learned them). Each mesh vertex's motion is shrunk by 1 - (noise / spread)^2, "
                           "its spread measured over the particles, and held still where the spread is below the "
                           "noise: where nothing moves, the flows' noise would otherwise misalign and blur the flex "
                           "map. 0 uses the flows as trained.")
        form.addParam("batchSize", params.IntParam, default=R.batch_size, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Batch size (particles)",
                      help=f"Particles per batch when streaming the particles (default {R.batch_size}). Larger "
                           "batches are "
                           "faster and use more GPU memory; the result does not depend on it.")
        form.addParam("seed", params.IntParam, default=R.seed, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed",
                      help="Seed of the random half-set split, used only when the particles carry no RELION random "
                           f"subsets (default {R.seed}).")
        form.addParallelSection(threads=4, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.convertInputStep, self._getInputParticles().getObjId(), needsGPU=False)
        args = self._getReconstructArgs()
        self._insertFunctionStep(self.reconstructStep, args, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, args, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self, particlesId: int) -> None:
        """Write the particles (ids, poses, CTF, optics) as the engine's STAR."""
        self.writeInputParticles()

    def reconstructStep(self, args: list) -> None:
        """Run flex-reconstruct into extra/reconstruct (from scratch: a rerun replaces old maps)."""
        pwutils.cleanPath(self._getReconstructDir())
        self.runEngine("flex-reconstruct", args)

    def createOutputStep(self, args: list) -> None:
        """Flex (and noflex) maps with their half maps at the particles' pixel size, and the half-map FSCs.

        `args` are the reconstruction step's: a Scipion Continue that reconstructs again also redoes the outputs.
        """
        info = self.getReconstructInfo()
        apix = float(info["apix"])
        kinds = ["flex"] + (["noflex"] if self.doNoflex.get() else [])
        outs = {}
        for kind in kinds:
            full, halfA, halfB = (self._getReconstructDir(f) for f in MAP_FILES[kind])
            vol = Volume()
            vol.setFileName(full)
            vol.setSamplingRate(apix)
            vol.setHalfMaps([halfA, halfB])
            outs[OUTPUT_MAPS[kind]] = vol

        fscs = self._createSetOfFSCs()
        for kind, (freq, values) in self.getFscCurves().items():
            fsc = FSC(objLabel=FSC_LABELS[kind])
            fsc.setData(freq.tolist(), values.tolist())
            fscs.append(fsc)
        for kind, (freq, values) in self.getCorrectedFscCurves().items():
            fsc = FSC(objLabel=CORRECTED_LABEL.format(FSC_LABELS[kind]))
            fsc.setData(freq.tolist(), values.tolist())
            fscs.append(fsc)
        outs[OUTPUT_FSCS] = fscs
        for kind, path in self.getLocalResolutionFiles().items():
            vol = Volume(objLabel=f"local resolution {'gain (noflex - flex)' if kind == 'gain' else kind} (Å)")
            vol.setFileName(path)
            vol.setSamplingRate(apix)
            outs[OUTPUT_LOCRES[kind]] = vol

        self._defineOutputs(**outs)
        chosen = getattr(self, INPUT_PARTICLES).get() is not None
        for obj in outs.values():
            self._defineSourceRelation(self.getTrainingParticles(), obj)
            if chosen:
                self._defineSourceRelation(getattr(self, INPUT_PARTICLES), obj)

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        if getattr(self, INPUT_TRAINING).get() is None:
            return []  # the form check reports the missing input
        errors = self._validateTraining()
        if errors:
            return errors
        parts = self._getInputParticles()
        errors += self._validateParticles(parts)
        if errors:
            return errors
        training = self.getTrainingParticles()
        extra = parts.getIdSet() - training.getIdSet()
        if extra:
            errors.append(f"{len(extra)} of the particles (e.g. id {min(extra)}) are not in the training: use the "
                          "training's particles or a subset of them (matched by id).")
        box, apix = parts.getXDim(), parts.getSamplingRate()
        tbox, tapix = training.getXDim(), training.getSamplingRate()
        if box != tbox or abs(apix - tapix) > 1e-3 * tapix:
            errors.append(f"The particles are {box} px at {apix:.4f} Å/px but the training's are {tbox} px at "
                          f"{tapix:.4f} Å/px: use particles with the training's box and pixel size.")
        errors += self._validateMask(box, apix)
        reg = self.regularisation.get()
        if reg is not None and reg <= 0:
            errors.append(f"The regularisation must be positive (or empty for the automatic value); got {reg:g}.")
        bins = self.latentBins.get()
        if bins is not None and bins < 1:
            errors.append(f"The number of latent bins must be at least 1 (or empty to choose it); got {bins}.")
        errors += self._validateGpu()
        return errors

    def _validateMask(self, box: int, apix: float) -> list[str]:
        """Errors for a mask that is neither at the particle box nor at the crop box, or at another pixel size."""
        mask = getattr(self, INPUT_MASK).get()
        if mask is None:
            return []
        dim = mask.getDim()
        if dim is None:
            return [f"Cannot read the mask file {mask.getFileName()}."]
        crop = int(self.getTrainingFlexInfo().getAttr("cropBox"))
        errors = []
        if len(set(dim)) != 1 or dim[0] not in (box, crop):
            boxes = f"the particle box ({box} px)" + (f" or the crop box ({crop} px)" if crop != box else "")
            errors.append(f"The mask is {dim[0]}x{dim[1]}x{dim[2]}: it must be cubic at {boxes}.")
        mapix = mask.getSamplingRate()
        if mapix and abs(mapix - apix) > 1e-3 * apix:
            errors.append(f"The mask has pixel size {mapix:.4f} Å but the particles have {apix:.4f} Å.")
        return errors

    def _summary(self) -> list[str]:
        info = self.getReconstructInfo()
        if info is None or not self.hasAttribute(OUTPUT_FLEX):
            return ["Output not ready yet."]
        fscKind = "masked" if info.get("masked_fsc") else "unmasked"
        lines = [f"Flex map: {_resolution(info.get('resolution_flex_A'))} ({fscKind} half-map FSC = 0.143)."]
        if info.get("resolution_noflex_A") is not None:
            lines.append(f"Noflex map: {_resolution(info['resolution_noflex_A'])}.")
        lines += self._resolutionSummary()
        bins = f"{info['bins']} latent bins, " if info.get("bins") else ""
        lines.append(f"{info['particles']} particles at the crop box {info['crop']} px ({info['apix']:.3f} Å/px), "
                     f"{bins}at most {info['iterations']} CG iterations per half map, {info['seconds'] / 60:.1f} min.")
        return lines

    def _resolutionSummary(self) -> list[str]:
        """Summary lines from resolution.json: the corrected masked FSCs and the median local resolution gain."""
        res = self.getResolutionInfo()
        if res is None:
            return []
        fsc = res.get("fsc", {})
        kind = ("masked FSC corrected by phase randomisation" if res.get("masked")
                else "unmasked FSC (no mask given)")
        lines = [f"Half-map {kind} (0.143): " + ", ".join(f"{k} {_resolution(v.get('resolution_A'))}"
                                                          for k, v in fsc.items()) + "."]
        for k, v in fsc.items():
            lines += [f"WARNING ({k}): {w}." for w in v.get("warnings", [])]
        gain = res.get("gain")
        loc = res.get("locres", {})
        where = "inside the mask" if res.get("masked") else "inside an automatic mask around the density"
        if gain and gain.get("median_A") is not None:
            medians = ", ".join(f"{k} {_resolution(v.get('median_in_region_A'))}" for k, v in loc.items())
            lines.append(f"Local resolution gain (noflex − flex): median {gain['median_A']:+.2f} Å {where}, "
                         f"{100 * gain['fraction_improved']:.0f} % of its voxels sharper with flex "
                         f"(median local resolution: {medians}).")
        return lines

    def _methods(self) -> list[str]:
        info = self.getReconstructInfo()
        if info is None:
            return []
        bins = f" on {info['bins']} latent bins" if info.get("bins") else ""
        text = (f"The canonical map of the 3D Flex [Punjani2023] model trained with flexplugin was reconstructed at "
                f"{info['crop']} px ({info['apix']:.3f} Å/px) from {info['particles']} particles, with the learned "
                f"motion undone, by preconditioned conjugate gradients (at most {info['iterations']} iterations per "
                f"half map){bins}; the half-map FSC "
                f"(0.143) gave {_resolution(info.get('resolution_flex_A'))}")
        if info.get("resolution_noflex_A") is not None:
            text += f", against {_resolution(info['resolution_noflex_A'])} for a rigid reconstruction"
        return [text + "."]

    def _citations(self) -> list[str]:
        return ["Punjani2023"]

    # --------------------------- UTILS functions -----------------------------
    def _getInputParticles(self, pointer: bool = False):
        """The chosen particles, or the training's particles when none are chosen."""
        ptr = getattr(self, INPUT_PARTICLES)
        if ptr.get() is not None:
            return ptr if pointer else ptr.get()
        training = getattr(self, INPUT_TRAINING).get()
        if pointer:
            if isinstance(training, Protocol):  # the form only admits a training run here
                return pwobj.Pointer(training, extended="outputParticles")
            return getattr(self, INPUT_TRAINING)
        return self.getTrainingParticles()

    def _getReconstructDir(self, *paths: str) -> str:
        return self._getExtraPath("reconstruct", *paths)

    def _getReconstructArgs(self) -> list:
        """The `flexplugin flex-reconstruct` argument list built from the form."""
        args = ["--model", self.getModelPath(),
                "--particles", self._getInputStarFile(),
                "--out", self._getReconstructDir()]
        args += self._settingArgs("iterations", "batch_size", "seed")  # the order runs have always had
        # empty: the engine's default
        args += self._settingArgs("noflex", "reg", "tol", "flow_tol", "max_bins", "bins", "flow_noise")
        mask = getattr(self, INPUT_MASK).get()
        if mask is not None:
            args += ["--mask", plainFileName(mask.getFileName())]
        return args + self.getDeviceArgs() + ["--threads", max(1, self.numberOfThreads.get() or 1)]

    def _settingArgs(self, *names: str) -> list:
        """flex-reconstruct's options for these ReconstructConfig fields, from the form (RECONSTRUCT_FORM)."""
        return engineArgs(ReconstructConfig, {name: getattr(self, RECONSTRUCT_FORM[name]).get() for name in names})

    def getReconstructInfo(self) -> dict | None:
        """flex-reconstruct's reconstruct.json (resolution_flex_A, resolution_noflex_A, particles, crop, ...)."""
        path = self._getReconstructDir("reconstruct.json")
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    def getFscCurves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{'flex': (frequency 1/Å, FSC), 'noflex': ...} from fsc.txt (noflex only when it was reconstructed)."""
        path = self._getReconstructDir("fsc.txt")
        if not os.path.exists(path):
            return {}
        table = np.loadtxt(path, ndmin=2)
        curves = {"flex": (table[:, 0], table[:, 1])}
        if self.doNoflex.get():
            curves["noflex"] = (table[:, 0], table[:, 2])
        return curves

    def getMapFiles(self) -> dict[str, tuple[str, str, str]]:
        """{'flex': (map, half A, half B), 'noflex': ...} paths (noflex only when it was reconstructed)."""
        kinds = ["flex"] + (["noflex"] if self.doNoflex.get() else [])
        return {k: tuple(self._getReconstructDir(f) for f in MAP_FILES[k]) for k in kinds}

    def getPlotFiles(self) -> dict[str, str]:
        """The engine's figures: 'fsc' (both FSC curves), 'maps' (central slices of the maps), 'fscMasked' (the
        masked FSCs with their phase-randomised and corrected curves) and 'gain' (local resolution and its gain)."""
        return {"fsc": self._getReconstructDir("fsc.png"), "maps": self._getReconstructDir("maps.png"),
                "fscMasked": self._getReconstructDir("fsc_masked.png"), "gain": self._getReconstructDir("locres_gain.png")}

    def getResolutionInfo(self) -> dict | None:
        """resolution.json of engine/resolution.write_resolution_outputs (fsc, locres, gain), None before it exists."""
        path = self._getReconstructDir("resolution.json")
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    def getCorrectedFscCurves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{'flex': (frequency 1/Å, FSC_true), 'noflex': ...}: the masked FSCs corrected by phase randomisation (empty
        without a mask)."""
        res = self.getResolutionInfo() or {}
        if not res.get("masked"):
            return {}
        return {k: (np.asarray(v["frequency"]), np.asarray(v["corrected"])) for k, v in res.get("fsc", {}).items()
                if v.get("corrected") is not None}

    def getLocalResolutionFiles(self) -> dict[str, str]:
        """{'flex': locres_flex.mrc, 'noflex': ..., 'gain': locres_gain.mrc}: those that exist."""
        files = {k: self._getReconstructDir(f) for k, f in LOCRES_FILES.items()}
        return {k: f for k, f in files.items() if os.path.exists(f)}


def _resolution(value) -> str:
    """A resolution in Å for summaries ('not reached' for missing or non-finite values)."""
    if value is None or not math.isfinite(float(value)):
        return "resolution not determined"
    return f"{float(value):.2f} Å"
