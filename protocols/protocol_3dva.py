"""3D variability analysis (3DVA): a linear subspace model of the particles' heterogeneity.

Mirrors cryoSPARC's "3D Variability" job (docs/algorithms.md §1.2) through `flexplugin 3dva`. Outputs the particles
with their reaction coordinates (SetOfParticlesFlex, read back by particle id from the engine's latents.csv), the
consensus map and the variability components.
"""
from __future__ import annotations

import json
import os
from enum import Enum

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import FlexInfo, SetOfParticlesFlex, SetOfVolumes, Volume
from pwem.protocols import ProtFlexBase

from flexplugin.convert import plainFileName, readSetOfParticlesFlex
from flexplugin.engine.latents import ID_LABEL
from flexplugin.engine.va3d_config import SCALES as SCALE_MODELS
from flexplugin.engine.va3d_config import VA3DConfig

from .constants import VA3D_PROGNAME, VA3D_RUN_JSON, VA3D_VARIANCE_JSON
from .protocol_base import (
    INPUT_MASK,
    INPUT_VOLUME,
    ButterworthFilterParams,
    FlexPluginProtBase,
    engineArgs,
    readJsonFile,
)

__all__ = ["FlexPluginProt3DVA"]

# The set-level FlexInfo (progName VA3D_PROGNAME) also holds runPath (the engine's folder, project-relative),
# consensusPath, K, box (px), samplingRate (Å/px), workingBox (px), workingSamplingRate (Å/px), filterRes (Å),
# iterations (done), explainedVariance and explainedVarianceFraction (CSV lists, one value per component).
SCALE_ATTR = "_flex3dvaScale"  # per-particle scale the engine fitted, kept on each output particle
INPUT_SCALE_ATTRS = ("_rlnCtfScalefactor", "_rlnGroupScaleCorrection")  # how RELION's scales reach Scipion
V = VA3DConfig()  # every 3DVA default is declared there, once
SCALES = list(SCALE_MODELS)  # the form's choices: the engine's --scales values
SCALES_OPTIMAL = SCALES.index(V.scales)
# the form parameter of each VA3DConfig field the form sets (the scales field's value is the index of its choice)
VA3D_FORM = {"k": "numberOfComponents", "iterations": "iterations", "filter_res": "filterRes",
             "filter_order": "filterOrder", "highpass_res": "highpassRes", "highpass_order": "highpassOrder",
             "lam": "varLambda", "scales": "scales", "white_noise": "whiteNoise", "gram_schmidt": "gramSchmidt",
             "box_crop": "workingBox", "num_particles": "numberOfParticles", "px_em": "pxEm",
             "batch_size": "batchSize", "seed": "seed"}
CHECKPOINT = "checkpoint.pt"
# arguments that may change when Scipion's Continue resumes a checkpoint (the engine ignores them in its key)
RESUMABLE_OPTIONS = ("--iterations", "--batch-size", "--device", "--threads")


class outputs(Enum):
    outputParticles = SetOfParticlesFlex
    outputVolume = Volume
    outputComponents = SetOfVolumes


class FlexPluginProt3DVA(ProtFlexBase, FlexPluginProtBase, ButterworthFilterParams):
    """3D variability analysis: fits each particle as the consensus map plus a weighted sum of K variability
    components (V_i = V0 + Σ z_ik V_k, probabilistic PCA solved by EM in Fourier space with the poses and CTFs
    of a consensus refinement fixed). The components live inside the mask and are low-pass filtered at the
    filter resolution. Outputs the particles with their K reaction coordinates (zFlex), the consensus map and the
    components. Symmetric data: run symmetry expansion first (the analysis is C1)."""

    _label = "3D variability analysis"
    _possibleOutputs = outputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        self._defineGpuParams(form)
        form.addSection(label="Input")
        self._defineParticlesParam(form)
        self._defineMaskParam(form, allowsNull=False, label="Mask",
                              help="A soft mask (values in [0, 1]) around the region whose variability is analysed, "
                                   "with the particles' box and pixel size (cryoSPARC: the 3DVA mask input, "
                                   "required). The components are confined to it: mask out solvent and, to "
                                   "focus, the parts you are not interested in.")
        self._defineVolumeParam(form, label="Consensus volume (optional)", allowsNull=True,
                                help="The consensus map V0 of the input particles (same box and pixel size), "
                                     "e.g. from the refinement that gave the poses. Empty: reconstructed from the "
                                     "particles (Wiener filtered, FSC-weighted half maps).")

        form.addSection(label="3D variability")
        form.addParam("numberOfComponents", params.IntParam, default=V.k,
                      label="Number of modes to solve",
                      help=f"K, the number of variability components (cryoSPARC: var_K, default {V.k}). Each "
                           "particle "
                           "gets K reaction coordinates.")
        form.addParam("iterations", params.IntParam, default=V.iterations,
                      label="Number of iterations",
                      help=f"EM iterations (cryoSPARC: var_num_iterations, default {V.iterations}). With Scipion's "
                           "Continue, "
                           "a larger number resumes a finished or interrupted run from its last iteration.")
        self._defineButterworthParams(
            form, required=True, orderLabels=("Filter order", "Highpass order"),
            lowpassLabel="Filter resolution (Å)",
            lowpassHelp="Resolution in Å at which the components are low-pass filtered (cryoSPARC: var_filter_res, "
                        "required, no default; typically 4-8 Å for real data). It must be at least 2 × the pixel "
                        "size (Nyquist). The images are Fourier-cropped to this resolution, so coarser values run "
                        "faster.",
            highpassLabel="Highpass resolution (Å)",
            highpassHelp="Resolution in Å below which variability is ignored: a Butterworth high-pass on the "
                         "components (cryoSPARC: var_highpass_res, default none). Must be coarser (larger) than the "
                         "filter resolution. Empty: no high-pass.")
        form.addParam("varLambda", params.FloatParam, default=V.lam, expertLevel=params.LEVEL_ADVANCED,
                      label="Lambda (stabilizing coefficient)",
                      help="Regularisation of the per-voxel solves, as a fraction of the mean data weight per "
                           f"voxel (cryoSPARC: var_lambda, default {V.lam:g}, dimensionless). {V.lam:g} suits "
                           "almost all "
                           "data; raise it if the components show artefacts or the run diverges.")
        form.addParam("scales", params.EnumParam, default=SCALES_OPTIMAL, choices=SCALES,
                      display=params.EnumParam.DISPLAY_HLIST,
                      label="Per-particle scale",
                      help="How each particle's contrast scale is set (cryoSPARC: var_use_scales, default "
                           "optimal). none: one global scale for all particles. input: the scale the particles "
                           "carry from RELION (rlnCtfScalefactor or rlnGroupScaleCorrection) times a global "
                           "scale. optimal: refitted to each particle after every iteration.")
        form.addParam("whiteNoise", params.BooleanParam, default=V.white_noise, expertLevel=params.LEVEL_ADVANCED,
                      label="Use white noise model?",
                      help="Use one noise variance for all frequencies instead of the coloured (per-shell) "
                           "noise model estimated from the residuals (cryoSPARC: var_use_white_noise, default "
                           "No).")
        form.addParam("gramSchmidt", params.BooleanParam, default=V.gram_schmidt, expertLevel=params.LEVEL_ADVANCED,
                      label="Use Gram-Schmidt?",
                      help="Orthogonalise the components after every iteration and order them by explained "
                           "variance (cryoSPARC: var_use_gramschmidt, default Yes).")
        form.addParam("workingBox", params.IntParam, default=None, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Working box (px)",
                      help="Box in pixels the images are Fourier-cropped to for the analysis (cryoSPARC: var_N). "
                           "Even, between 8 and the particle box. Empty: the smallest box whose Nyquist reaches "
                           "the filter resolution (2 × box × pixel size / filter resolution, rounded up to even).")
        form.addParam("numberOfParticles", params.IntParam, default=None, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Only use this many particles",
                      help="Analyse only the first N particles, in particle id order (cryoSPARC: "
                           "var_num_particles). Empty: all. The output then holds those N particles only.")
        form.addParam("pxEm", params.BooleanParam, default=V.px_em, expertLevel=params.LEVEL_ADVANCED,
                      label="Parameter-expanded EM?",
                      help="Rescale the components after every M-step so the coordinates keep unit variance "
                           "(parameter-expanded EM, Liu, Rubin & Wu 1998): same model, much faster convergence "
                           "(default Yes). No: plain PPCA EM.")
        form.addParam("noiseFloor", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Estimate the noise floor?",
                      help="Also run the analysis on the particles with shuffled poses, where true 3D variability "
                           "cancels, and report its largest explained variance as the floor a real component "
                           "must exceed (default No; doubles the run time).")
        form.addParam("batchSize", params.IntParam, default=V.batch_size, expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.GE(1, "Use at least one particle per batch")],
                      label="Batch size (particles)",
                      help=f"Images per batch (default {V.batch_size}). Larger batches are faster and use more "
                           "(GPU) memory; "
                           "the result does not depend on it.")
        form.addParam("seed", params.IntParam, default=V.seed, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed",
                      help=f"Seed of the random initial components (default {V.seed}).")
        form.addParallelSection(threads=4, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.convertInputStep, self._getInputParticles().getObjId(),
                                 self._usesInputScales(), needsGPU=False)
        args = self._getVa3dArgs()
        self._insertFunctionStep(self.va3dStep, args, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, args, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self, particlesId: int, withScales: bool) -> None:
        """Write the particles as the engine's STAR (with rlnCtfScalefactor when the input scales are used)."""
        if not withScales:
            self.writeInputParticles()
            return
        from flexplugin import convert
        from flexplugin.engine.io import write_particles_star
        parts = self._getInputParticles()
        particles, optics = convert.particlesToStarTables(parts, self._getExtraPath("input", "stacks"))
        scales = self._getInputScales(parts)
        particles["rlnCtfScalefactor"] = [scales[int(i)] for i in particles[ID_LABEL]]
        path = self._getInputStarFile()
        pwutils.makePath(os.path.dirname(path))
        write_particles_star(path, particles, optics)
        self.info(f"Wrote {len(particles)} particles with their input scales to {path}")

    def va3dStep(self, args: list) -> None:
        """Run 3dva into extra/3dva, resuming its checkpoint when the settings that shape the model are unchanged.

        Scipion's Continue re-runs this step when e.g. the number of iterations grew: the checkpoint of this run is
        then resumed (finished iterations are kept). A checkpoint made with other settings is discarded.
        """
        runDir = self._getRunDir()
        settings = self._getModelSettings(args)
        settingsFile = self._getExtraPath("3dva_settings.json")
        if os.path.exists(self._getRunDir(CHECKPOINT)):
            previous = None
            if os.path.exists(settingsFile):
                with open(settingsFile) as fh:
                    previous = json.load(fh)
            if previous == settings:
                self.info(f"Continuing from the checkpoint in {runDir}")
                args = args + ["--continue"]
            else:
                self.info(f"The settings changed since the checkpoint in {runDir} was written: starting over")
                pwutils.cleanPath(runDir)
        pwutils.makePath(os.path.dirname(settingsFile))
        with open(settingsFile, "w") as fh:
            json.dump(settings, fh, indent=1)
        self.runEngine("3dva", args)

    def createOutputStep(self, args: list) -> None:
        """Particles with their K coordinates (zFlex, matched by id), the consensus map and the components.

        `args` are the analysis step's: a Scipion Continue that resumes the analysis also redoes the outputs.
        """
        from flexplugin.engine.va3d.outputs import SCALE_COLUMN  # (torch: not when Scipion loads the protocol)
        run = self.getRunInfo()
        apix = float(run["apix"])
        outSet = self._createSetOfParticlesFlex(progName=VA3D_PROGNAME)
        limited = self.numberOfParticles.get() is not None  # the particles beyond the limit have no coordinates
        _, missing = readSetOfParticlesFlex(self._getInputParticles(), self._getRunDir(run["files"]["latents_csv"]),
                                            outSet, VA3D_PROGNAME, flexInfo=self._makeFlexInfo(run),
                                            extraAttrs={SCALE_COLUMN: SCALE_ATTR}, skipMissing=limited)
        if missing:
            self.info(f"{missing} particles beyond the first {outSet.getSize()} were not analysed and are left out")

        consensus = Volume()
        consensus.setFileName(self._getRunDir(run["files"]["consensus"]))
        consensus.setSamplingRate(apix)

        variances = self.getExplainedVariance()
        components = self._createSetOfVolumes(suffix="_components")
        components.setSamplingRate(apix)
        for i, name in enumerate(run["files"]["components"]):
            vol = Volume()
            vol.setFileName(self._getRunDir(name))
            vol.setSamplingRate(apix)
            vol.setObjLabel(f"component {i + 1}")
            if variances:
                c = variances[i]
                vol.setObjComment(f"explained variance {c['eigenvalue']:.4g} "
                                  f"({100 * c['fraction_of_total_eigenvalue']:.1f} % of the total)")
            components.append(vol)

        self._defineOutputs(**{outputs.outputParticles.name: outSet, outputs.outputVolume.name: consensus,
                               outputs.outputComponents.name: components})
        particlesPtr = self._getInputParticles(pointer=True)
        self._defineSourceRelation(particlesPtr, outSet)
        self._defineSourceRelation(particlesPtr, consensus)
        self._defineSourceRelation(particlesPtr, components)
        self._defineSourceRelation(getattr(self, INPUT_MASK), components)
        if getattr(self, INPUT_VOLUME).get() is not None:
            self._defineSourceRelation(getattr(self, INPUT_VOLUME), consensus)

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        errors = super()._validate()
        parts = self._getInputParticles()
        k = self.numberOfComponents.get()
        if k is None or k < 1:
            errors.append("The number of modes to solve (K) must be at least 1.")
        if self.iterations.get() is None or self.iterations.get() < 1:
            errors.append("Run at least one iteration.")
        if self.varLambda.get() is None or self.varLambda.get() < 0:
            errors.append("Lambda must be 0 or more.")
        filterRes, highpass = self.filterRes.get(), self.highpassRes.get()
        if filterRes is None or filterRes <= 0:
            errors.append("Set the filter resolution in Å (required; typically 4-8 Å, at least twice the pixel "
                          "size).")
        if highpass is not None and (highpass <= 0 or (filterRes and highpass <= filterRes)):
            errors.append(f"The highpass resolution ({highpass:g} Å) must be coarser (larger) than the filter "
                          f"resolution ({filterRes} Å), or empty.")
        errors += self._validateFilterOrders()
        if parts is None:
            return errors
        apix, box = parts.getSamplingRate(), parts.getXDim()
        if filterRes and apix and filterRes < 2 * apix - 1e-6:
            errors.append(f"The filter resolution ({filterRes:g} Å) is finer than Nyquist: it must be at least "
                          f"2 × the pixel size = {2 * apix:.3f} Å.")
        wb = self.workingBox.get()
        if wb is not None and box and (wb % 2 or wb < 8 or wb > box):
            errors.append(f"The working box must be even, at least 8 and at most the particle box ({box} px); "
                          f"got {wb}.")
        n = parts.getSize()
        limit = self.numberOfParticles.get()
        if limit is not None:
            if limit < 2:
                errors.append("Use at least 2 particles.")
            n = min(n, limit)
        if k and k >= 1 and n < 2 * k:
            errors.append(f"{n} particles are too few for {k} components: use at least {2 * k}.")
        first = parts.getFirstItem()
        if self._usesInputScales() and first is not None and self._particleScale(first) is None:
            errors.append("Per-particle scale 'input' needs particles carrying RELION's rlnCtfScalefactor (or "
                          "rlnGroupScaleCorrection): choose optimal or none.")
        return errors

    def _summary(self) -> list[str]:
        run = self.getRunInfo()
        if run is None or not self.hasAttribute(outputs.outputParticles.name):
            return ["Output not ready yet."]
        lines = [f"{run['n_particles']} particles, K = {len(run['files']['components'])} components, "
                 f"{len(run['history'])} iterations in {run['seconds'] / 60:.1f} min; filter resolution "
                 f"{run['config']['filter_res']:g} Å, working box {run['working_box']} px "
                 f"({run['working_apix']:.3f} Å/px)."]
        floor = self._getNoiseFloor()
        for i, c in enumerate(self.getExplainedVariance() or []):
            line = (f"Component {i + 1}: explained variance {c['eigenvalue']:.4g} "
                    f"({100 * c['fraction_of_total_eigenvalue']:.1f} % of the total), "
                    f"coordinate variance {c['latent_variance']:.4g}")
            if "above_noise_floor" in c:
                line += ", above" if c["above_noise_floor"] else ", BELOW"
                line += f" the noise floor ({floor:.4g})"
            lines.append(line + ".")
        return lines

    def _methods(self) -> list[str]:
        run = self.getRunInfo()
        if run is None:
            return []
        cfg = run["config"]
        return [f"3D variability analysis [Punjani2021] was run with flexplugin's PyTorch implementation on "
                f"{run['n_particles']} particles ({run['box']} px, {run['apix']:.3f} Å/px), solving "
                f"{cfg['k']} components filtered at {cfg['filter_res']:g} Å in {len(run['history'])} EM "
                f"iterations (lambda {cfg['lam']:g}, per-particle scales: {cfg['scales']}, "
                f"{'white' if cfg['white_noise'] else 'coloured'} noise model)."]

    def _citations(self) -> list[str]:
        return ["Punjani2021"]

    # --------------------------- UTILS functions -----------------------------
    def _getRunDir(self, *paths: str) -> str:
        """The engine's output folder (extra/3dva) or a file in it."""
        return self._getExtraPath("3dva", *paths)

    def getRunFile(self, *paths: str) -> str:
        """A file of the engine's run folder (a name from run.json's "files"), for viewers and later protocols."""
        return self._getRunDir(*paths)

    def _usesInputScales(self) -> bool:
        return self.scales.get() == SCALES.index("input")

    @staticmethod
    def _particleScale(particle) -> float | None:
        """The RELION scale a particle carries (rlnCtfScalefactor, else rlnGroupScaleCorrection), or None."""
        for attr in INPUT_SCALE_ATTRS:
            obj = getattr(particle, attr, None)
            if obj is not None and obj.get() is not None:
                return float(obj.get())
        return None

    @classmethod
    def _getInputScales(cls, parts) -> dict[int, float]:
        """{particle id: RELION scale}; raises ValueError naming a particle without one."""
        scales = {}
        for p in parts.iterItems(orderBy="id"):
            value = cls._particleScale(p)
            if value is None:
                raise ValueError(f"particle {p.getObjId()} carries no rlnCtfScalefactor or rlnGroupScaleCorrection: "
                                 "use the per-particle scale 'optimal' or 'none'")
            scales[int(p.getObjId())] = value
        return scales

    def _getVa3dArgs(self) -> list:
        """The `flexplugin 3dva` argument list built from the form."""
        args = ["--particles", self._getInputStarFile(),
                "--mask", plainFileName(getattr(self, INPUT_MASK).get().getFileName())]
        vol = getattr(self, INPUT_VOLUME).get()
        if vol is not None:
            args += ["--volume", plainFileName(vol.getFileName())]
        args += ["--out", self._getRunDir()]
        # VA3DConfig's options in the order runs have always had (Continue compares the step's arguments)
        args += self._settingArgs("k", "iterations", "filter_res", "filter_order", "highpass_res", "highpass_order",
                                  "lam", "scales", "white_noise", "gram_schmidt", "box_crop", "num_particles",
                                  "px_em")
        if self.noiseFloor.get():
            args += ["--noise-floor"]
        args += self._settingArgs("batch_size", "seed")
        return args + self.getDeviceArgs() + ["--threads", max(1, self.numberOfThreads.get() or 1)]

    def _settingArgs(self, *names: str) -> list:
        """3dva's options for these VA3DConfig fields, from the form (VA3D_FORM; empty fields keep the engine's
        defaults)."""
        values = {name: getattr(self, VA3D_FORM[name]).get() for name in names}
        if values.get("scales") is not None:
            values["scales"] = SCALES[values["scales"]]
        return engineArgs(VA3DConfig, values)

    def _getModelSettings(self, args: list) -> list[str]:
        """The arguments that shape the model (what a checkpoint must share with a run resuming it), plus the
        input particle set's id (the STAR path stays the same when the input changes)."""
        kept, skip = [], False
        for a in args:
            if skip:
                skip = False
                continue
            if a in RESUMABLE_OPTIONS:
                skip = True
                continue
            kept.append(str(a))
        return kept + [f"particles={self._getInputParticles().getObjId()}"]

    def _makeFlexInfo(self, run: dict) -> FlexInfo:
        """Set-level FlexInfo: where the run's files are, its grid and its explained variances."""
        variances = self.getExplainedVariance() or []
        flexInfo = FlexInfo(VA3D_PROGNAME)
        flexInfo.setAttr("runPath", self._getRunDir())
        flexInfo.setAttr("consensusPath", self._getRunDir(run["files"]["consensus"]))
        flexInfo.setAttr("K", len(run["files"]["components"]))
        flexInfo.setAttr("box", int(run["box"]))
        flexInfo.setAttr("samplingRate", float(run["apix"]))
        flexInfo.setAttr("workingBox", int(run["working_box"]))
        flexInfo.setAttr("workingSamplingRate", float(run["working_apix"]))
        flexInfo.setAttr("filterRes", float(run["config"]["filter_res"]))
        flexInfo.setAttr("iterations", len(run["history"]))
        flexInfo.setAttr("explainedVariance", [float(c["eigenvalue"]) for c in variances])
        flexInfo.setAttr("explainedVarianceFraction", [float(c["fraction_of_total_eigenvalue"]) for c in variances])
        return flexInfo

    def getRunInfo(self) -> dict | None:
        """3dva's run.json (n_particles, box, apix, working_box, config, history, seconds, files) or None."""
        return readJsonFile(self._getRunDir(VA3D_RUN_JSON))

    def getExplainedVariance(self) -> list[dict] | None:
        """Per component (in order): eigenvalue, fraction_of_total_eigenvalue, latent_variance,
        residual_power_fraction (and above_noise_floor with the noise floor), from explained_variance.json."""
        info = readJsonFile(self._getRunDir(VA3D_VARIANCE_JSON))
        return info["components"] if info is not None else None

    def _getNoiseFloor(self) -> float | None:
        info = readJsonFile(self._getRunDir(VA3D_VARIANCE_JSON))
        floor = info.get("noise_floor") if info is not None else None
        return floor["floor_eigenvalue"] if floor else None

    def getPlotFiles(self) -> dict[str, str]:
        """The diagnostics 3dva draws (PNG): histograms, pairs (K > 1), convergence, explained_variance,
        components (slices)."""
        run = self.getRunInfo()
        if run is not None:
            return {name: self._getRunDir(path) for name, path in run["files"]["plots"].items()}
        names = ("histograms", "pairs", "convergence", "explained_variance", "components")
        return {name: self._getRunDir("plots", f"{name}.png") for name in names}
