"""3D Flex training: a flow generator that deforms a canonical map along a mesh, and a latent per particle.

Mirrors cryoSPARC's "3D Flex Training" (docs/algorithms.md §2.3) through `flexplugin flex-train`, with the data prep
crop/training boxes as parameters. Outputs the particles with their latent coordinates (SetOfParticlesFlex,
read back by particle id) and the canonical map at the training box.
"""
from __future__ import annotations

import os
import re
from enum import Enum

import pyworkflow as pw
import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import FlexInfo, SetOfParticlesFlex, Volume
from pwem.protocols import ProtFlexBase

from flexplugin.convert import plainFileName, readSetOfParticlesFlex, writeZFlexLatents
from flexplugin.engine.flex.config import TrainConfig
from flexplugin.engine.flex.loading import LOADER_WORKERS, SCRATCH_ENV
from flexplugin.engine.flex.mesh_config import MeshConfig
from flexplugin.engine.flex.prep_config import PrepConfig

from .constants import FLEX_PROGNAME, MESH_FILES, TRAIN_FILES, TRAIN_PLOTS
from .protocol_base import INPUT_MASK, INPUT_VOLUME, FlexPluginProtBase, engineArgs, meshEngineArgs, readJsonFile

D = TrainConfig()  # every training default is declared there, once
M = MeshConfig()  # the automatic mesh's settings: flex-mesh's defaults
P = PrepConfig()  # the data prep's boxes
PREP_FORM = {"crop": "cropBox", "train_box": "trainingBox"}  # the form parameter of each PrepConfig field
# the form parameter of each TrainConfig field the form sets (the others keep the engine's default)
TRAIN_FORM = {"k": "numberOfLatents", "layers": "layers", "hidden": "hiddenUnits", "epochs": "epochs",
              "extra_epochs": "extraEpochs", "batch_size": "batchSize", "lr_flow_init": "lrFlowInit",
              "lr_flow_final": "lrFlowFinal", "lr_density": "lrDensity", "lr_latent": "lrLatent",
              "rigidity": "rigidity", "latent_noise": "latentNoise", "latent_prior": "latentPrior",
              "latent_prior_pow": "latentPriorPow", "seed": "seed", "search_start": "searchStart",
              "search_every": "searchEvery", "search_points": "searchPoints", "search_kmax": "searchKmax",
              "final_search": "finalSearch"}
THIS_RUN = ("epochs", "extra_epochs")  # a continued run trains to its own epochs; other settings are the source's

__all__ = ["FlexPluginProtTrain"]

# The set-level FlexInfo (progName FLEX_PROGNAME) also holds modelPath, checkpointPath, meshPath (project-relative),
# latentDim, trainingBox, cropBox (px), trainingSamplingRate (Å/px) and epochs (finished).
MESH_EXTENT_TOLERANCE = 0.02  # relative, as the engine checks it


class outputs(Enum):
    outputParticles = SetOfParticlesFlex
    outputVolume = Volume


class FlexPluginProtTrain(ProtFlexBase, FlexPluginProtBase):
    """Trains 3D Flex: a neural flow generator maps a low-dimensional latent coordinate to a deformation of
    a tetrahedral mesh; the deformed canonical map, projected with each particle's pose and CTF, is fit to
    the images while each particle's latent is optimised. Rigidity and latent-centring priors keep the motion
    physical. Outputs the particles with their latents (zFlex) and the canonical map."""

    _label = "3D flex training"
    _possibleOutputs = outputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        self._defineGpuParams(form)
        fresh = "not doContinue"
        form.addSection(label="Input")
        form.addParam("doContinue", params.BooleanParam, default=False,
                      label="Continue a previous training?",
                      help="Resume a finished or interrupted 3D flex training run from its last checkpoint: its "
                           "inputs and settings are reused, finished epochs are kept and training goes on up to "
                           "this run's 'Number of epochs' + 'Extra epochs'. The previous run is not modified.")
        form.addParam("continueRun", params.PointerParam, pointerClass="FlexPluginProtTrain",
                      condition="doContinue", allowsNull=True,
                      label="Training run to continue",
                      help="A previous 3D flex training run (it must have written a checkpoint).")
        self._defineParticlesParam(form, condition=fresh)
        form.addParam("initFromInput", params.BooleanParam, default=True, condition=fresh,
                      label="Initialize latents from input?",
                      help="When the input particles carry latent coordinates (a SetOfParticlesFlex, e.g. from 3D "
                           "variability analysis or an earlier training), start the 3D Flex latents from them, "
                           "matched by particle id and rescaled (cryoSPARC: flex_latent_ext_init, default Yes). "
                           "Ignored for plain particle sets, which start from random latents.")
        form.addParam("initComponents", params.StringParam, default="", condition=f"{fresh} and initFromInput",
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Input components to use",
                      help="Which of the input coordinates seed the latent dimensions, numbered from 1 and one per "
                           "latent dimension, e.g. '1 3' to seed 2 dimensions with the 1st and 3rd components "
                           "(cryoSPARC: flex_latent_ext_init_idxs). Empty: the first K components.")
        self._defineVolumeParam(form, condition=fresh,
                                help="The consensus map of the input particles (same box and pixel size), e.g. "
                                     "from the refinement that gave the poses. It is cropped and downsampled like "
                                     "the particles and initialises the canonical map.")
        form.addParam("meshRun", params.PointerParam, pointerClass="FlexPluginProtMeshPrep", allowsNull=True,
                      condition=fresh,
                      label="Mesh (3D flex mesh prep run)",
                      help="A '3D flex mesh prep' run whose mesh spans the crop box below. Leave empty to build a "
                           f"default mesh automatically ({M.cells} cells across the crop box, minimum rigidity "
                           f"{M.rigidity_min:g}) over "
                           "the mask below, or over a mask made from the consensus map.")
        self._defineMaskParam(form, condition=f"{fresh} and meshRun is None",
                              label="Solvent mask (automatic mesh)",
                              help="Only for the automatic mesh: a mask around the particle (values in [0, 1], "
                                   "same box and pixel size as the particles). Empty: made from the map "
                                   f"({M.mask_lowpass:g} Å low-pass, 5 % of the maximum, {M.mask_dilate:g} Å "
                                   f"dilation, {M.mask_pad:g} Å soft edge).")

        form.addSection(label="Data prep")
        form.addParam("cropBox", params.IntParam, default=None, allowsNull=True, condition=fresh,
                      label="Crop box size (pix)",
                      help="Real-space crop of particles and map about their centre before downsampling "
                           "(cryoSPARC Data Prep: box_size_pix). Empty: keep the full particle box. Crop away "
                           "empty solvent to save time; a mesh prep run must use the same crop box.")
        form.addParam("trainingBox", params.IntParam, default=P.train_box, condition=fresh,
                      label="Training box size (pix)",
                      help="Particles and map are Fourier-cropped from the crop box to this box for training "
                           f"(cryoSPARC Data Prep: bin_size_pix, default {P.train_box}). Even, at least 16 and at "
                           "most the "
                           "crop box. The training pixel size is pixel size × crop box / training box. Keep "
                           "training Nyquist below the consensus resolution; boxes above 256 become very slow.")

        form.addSection(label="Training")
        form.addParam("numberOfLatents", params.IntParam, default=D.k, condition=fresh,
                      validators=[params.Range(1, 16, "Use 1 to 16 latent dimensions (start with 2)")],
                      label="Number of latent dims",
                      help=f"Dimensions K of the latent space (cryoSPARC: flex_K, default {D.k}). Start with 2 and "
                           "increase when the motion looks richer than the latent plots can hold.")
        form.addParam("epochs", params.IntParam, default=D.epochs, validators=[params.GE(1)],
                      label="Number of epochs",
                      help="Epochs of the base schedule, over which the learning rate is annealed and the "
                           f"resolution is raised to {D.kmax_final * 100:g} % of training Nyquist (default {D.epochs}). "
                           "When continuing, "
                           "training goes on up to this plus the extra epochs.")
        form.addParam("extraEpochs", params.IntParam, default=D.extra_epochs, validators=[params.GE(0)],
                      label="Extra epochs",
                      help="Epochs after the base schedule at its final learning rate and resolution "
                           f"(cryoSPARC: flex_extra_epochs, default {D.extra_epochs}). Add some when the losses "
                           "still fall at "
                           "the end.")
        form.addParam("rigidity", params.FloatParam, default=D.rigidity, condition=fresh,
                      validators=[params.GE(0)],
                      label="Rigidity (lambda)",
                      help="Weight of the prior that keeps each mesh cell close to a rigid motion (cryoSPARC: "
                           f"flex_sv_lam, default {D.rigidity:g}). It weighs the volume-weighted mean of "
                           "the cells' deviation from rigidity, so its meaning does not change with the number of "
                           "mesh cells or the mask's size. Raise it when the flow looks noisy or tears density "
                           "apart; lower it when real motions come out too small.")
        form.addParam("latentPrior", params.FloatParam, default=D.latent_prior, condition=fresh, validators=[params.GE(0)],
                      label="Latent centering strength",
                      help="Strength of the prior that keeps latents near 0 (cryoSPARC: flex_latent_prior_lam, "
                           f"default {D.latent_prior:g}). Raise it if many latents reach the ends of the (-1.5, 1.5) "
                           "range; lower "
                           "it if they are bunched at 0.")
        form.addParam("latentNoise", params.FloatParam, default=D.latent_noise, condition=fresh, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Noise injection stdev",
                      help="Standard deviation of the noise added to latents while training, in latent units "
                           f"(latents span about -1.5..1.5) (cryoSPARC: flex_latent_samp_std, default "
                           f"{D.latent_noise:g}). It "
                           "smooths the generator over latent space; raise it if nearby latents give very "
                           "different flows.")
        form.addParam("latentPriorPow", params.FloatParam, default=D.latent_prior_pow, condition=fresh,
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Latent centering power",
                      help="Exponent p of the centring prior strength × |z|^p (cryoSPARC: flex_latent_prior_pow, "
                           f"default {D.latent_prior_pow:g}): higher values leave the centre free and push back "
                           "harder near the ends.")
        form.addParam("layers", params.IntParam, default=D.layers, condition=fresh, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Number of layers (flow generator)",
                      help=f"Hidden layers of the flow generator network (cryoSPARC: flex_num_layers, default "
                           f"{D.layers}).")
        form.addParam("hiddenUnits", params.IntParam, default=D.hidden, condition=fresh, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Hidden units per layer",
                      help=f"Width of each hidden layer (cryoSPARC: flex_hidden_units, default {D.hidden}). Wider "
                           "layers "
                           "can express more complex motions and overfit more easily.")
        form.addParam("lrFlowInit", params.FloatParam, default=D.lr_flow_init, condition=fresh,
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Flow learning rate: initial",
                      help="Learning rate of the flow generator at the start of the schedule (cryoSPARC: "
                           f"flex_lr_flex_init, default {D.lr_flow_init:g}).")
        form.addParam("lrFlowFinal", params.FloatParam, default=D.lr_flow_final, condition=fresh,
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Flow learning rate: final",
                      help="Learning rate of the flow generator at the end of the schedule and during extra "
                           f"epochs (cryoSPARC: flex_lr_flex_final, default {D.lr_flow_final:g}).")
        form.addParam("lrDensity", params.FloatParam, default=D.lr_density, condition=fresh,
                      validators=[params.Positive], expertLevel=params.LEVEL_ADVANCED,
                      label="Density learning rate",
                      help="Learning rate of the canonical map (cryoSPARC: flex_lr_density_init/_final, default "
                           f"{D.lr_density:g}).")
        form.addParam("lrLatent", params.FloatParam, default=None, allowsNull=True, condition=fresh,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Latent learning rate",
                      help="Step size of the per-particle latent coordinates (flexplugin's per-particle Adam). "
                           "Empty (default): 0.01 when the latents are seeded (e.g. from 3DVA), which keeps a good "
                           "seed, and 0.05 from random latents, which is needed to find the motion. Lower it if "
                           "latents jump between epochs.")
        form.addParam("batchSize", params.IntParam, default=D.batch_size, condition=fresh, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Batch size (particles)",
                      help=f"Particles per optimisation step (default {D.batch_size}). Larger batches use more GPU "
                           "memory.")
        form.addParam("seed", params.IntParam, default=D.seed, condition=fresh, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed",
                      help=f"Seed of the batch order, the injected noise and the initialisation (default {D.seed}).")
        group = form.addGroup("Latent search", condition=fresh, expertLevel=params.LEVEL_ADVANCED)
        group.addParam("searchStart", params.IntParam, default=D.search_start, validators=[params.GE(0)],
                       label="First search epoch",
                       help="First epoch that begins with a latent search: every particle's latent becomes its "
                            "posterior mean over a grid of maps decoded by the current model (default "
                            f"{D.search_start}; 0 searches before any training).")
        group.addParam("searchEvery", params.IntParam, default=D.search_every, validators=[params.GE(0)],
                       label="Epochs between searches",
                       help=f"Epochs between latent searches (default {D.search_every}; 0: never during training).")
        group.addParam("searchPoints", params.IntParam, default=D.search_points,
                       validators=[params.Range(0, 64, "0 (automatic) or 2 to 64")],
                       label="Grid points per latent axis",
                       help="Grid points per latent axis of a search (0, the default: 15 for K=1, 9 for K≥2; K≥3 "
                            "uses points² quasi-random points). The final search uses about twice as many.")
        group.addParam("searchKmax", params.FloatParam, default=D.search_kmax,
                       validators=[params.Range(0.01, 1.0, "a fraction of Nyquist in (0, 1]")],
                       label="Search band (fraction of Nyquist)",
                       help="Band of the searches during training as a fraction of the training Nyquist, capped by "
                            f"the epoch's band (default {D.search_kmax:g}: the epoch's band). A lower band (e.g. "
                            "0.5) makes searches cheaper at some cost in latent accuracy.")
        group.addParam("finalSearch", params.BooleanParam, default=D.final_search,
                       label="Final search",
                       help="A finer latent search after the last epoch; its latents are the ones written out.")
        self._defineLoadingParams(form)
        form.addParallelSection(threads=4, mpi=0)

    def _defineLoadingParams(self, form: params.Form) -> None:
        """How the training reads its particles (this run's, also when continuing): DataLoader workers and the
        prepared-particles cache on a scratch folder (flex-train --workers / --scratch, docs/distributed.md)."""
        group = form.addGroup("Reading the particles", expertLevel=params.LEVEL_ADVANCED)
        group.addParam("loaderWorkers", params.IntParam, default=LOADER_WORKERS, validators=[params.GE(0, "Use 0 or more loader workers (0: batches prepared in "
                                                          "the training process)")],
                       label="Loader workers (processes)",
                       help="Processes that read and prepare the next batches of particles while the current one "
                            f"trains (flex-train --workers, default {LOADER_WORKERS}: in the training process). Try "
                            "2-4 beside a GPU when the particles come from a slow disk; each is a process of its "
                            "own beside the threads (and one set per GPU with several GPUs), so leave cores for "
                            "them. The results do not depend on it.")
        group.addParam("useScratch", params.BooleanParam, default=True,
                       label="Cache prepared particles on scratch?",
                       help="Prepare the particles once (cropped and downsampled to the training box, float16) in a "
                            "scratch folder and read them from there in every epoch instead of the full-size "
                            "stacks: epochs read far less and memory stays flat with the number of particles "
                            "(flex-train --scratch). The cache takes 2 x training box² bytes per particle (8 KiB "
                            "at box 64, 32 KiB at box 128). Where: the folder below; when it is empty, the "
                            f"engine's ${SCRATCH_ENV} if set, else Scipion's scratch (SCIPION_SCRATCH: this run's "
                            "temporary folder there, deleted by Scipion when the run finishes), else no cache. "
                            "No: never a cache.")
        group.addParam("scratchFolder", params.FolderParam, default="", condition="useScratch",
                       label="Scratch folder",
                       help="A folder on a fast local disk for the prepared-particles cache, e.g. /ssd/flexcache, "
                            "or '$TMPDIR' for a cluster node's local disk: environment variables are expanded on "
                            "the machine that trains (each node builds its own copy). The cache is named by the "
                            "particles and boxes and reused by later runs on the same particles; it is not deleted: "
                            "clear the folder yourself. Empty: see above.")

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.convertInputStep, self._getInputParticles().getObjId(), needsGPU=False)
        if self._needsOwnMesh():
            self._insertFunctionStep(self.meshStep, self._getAutoMeshArgs(), needsGPU=False)
        trainArgs = self._getTrainArgs()
        self._insertFunctionStep(self.trainStep, trainArgs, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, trainArgs, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self, particlesId: int) -> None:
        """Write the particles as the engine's STAR and, when seeding, their zFlex as an id-keyed CSV."""
        self.writeInputParticles()
        if self._seedsLatents():
            self._writeInitLatents(self._getInitLatentsFile())

    def meshStep(self, args: list) -> None:
        """Build the automatic mesh with flex-mesh's defaults over the consensus map (flex-mesh crops it to the
        crop box)."""
        pwutils.cleanPath(self._getAutoMeshDir())
        self.runEngine("flex-mesh", args)

    def trainStep(self, args: list) -> None:
        """Run flex-train, resuming from a checkpoint in this run's folder or copied from the run continued.

        A checkpoint already in this run's folder (Scipion's Continue of an interrupted or extended run) is always
        resumed, so finished epochs are never lost.
        """
        ckpt = self.getTrainFile("checkpoint")
        if not os.path.exists(ckpt) and self.doContinue.get():
            prev = self.continueRun.get().getTrainFile("checkpoint")
            pwutils.makePath(self._getTrainDir())
            pwutils.copyFile(prev, ckpt)
            self.info(f"Continuing from the checkpoint of {self.continueRun.get().getRunName()}: {prev}")
        if os.path.exists(ckpt):
            args = args + ["--continue"]
        self.runEngine("flex-train", args)

    def createOutputStep(self, trainArgs: list) -> None:
        """Particles with their latents (zFlex, matched by id) and the canonical map at the training box.

        `trainArgs` are the training step's: a Scipion Continue that retrains (e.g. more epochs) redoes outputs.
        """
        info = self.getTrainInfo()
        outSet = self._createSetOfParticlesFlex(progName=FLEX_PROGNAME)
        readSetOfParticlesFlex(self._getInputParticles(), self.getTrainFile("latents"), outSet, FLEX_PROGNAME,
                               flexInfo=self._makeFlexInfo(info))

        canonical = Volume()
        canonical.setFileName(self.getTrainFile("canonical"))
        canonical.setSamplingRate(float(info["apix_train"]))

        self._defineOutputs(**{outputs.outputParticles.name: outSet, outputs.outputVolume.name: canonical})
        source = self._getSettingsSource()
        self._defineSourceRelation(source._getInputParticles(pointer=True), outSet)
        self._defineSourceRelation(source._getInputParticles(pointer=True), canonical)
        self._defineSourceRelation(getattr(source, INPUT_VOLUME), canonical)

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        if self.doContinue.get():
            errors = self._validateContinue()
            if errors:
                return errors
        errors = super()._validate() + self._validateScratch()
        parts = self._getInputParticles()
        if parts is None:
            return errors
        src = self._getSettingsSource()
        box, apix = self._getParticleBox(), parts.getSamplingRate()
        crop, train = src._getCropBox(), src.trainingBox.get()
        if src.numberOfLatents.get() is None or src.numberOfLatents.get() < 1:
            errors.append("The number of latent dimensions must be at least 1.")
        if box:
            if crop > box or crop < 16 or crop % 2:
                errors.append(f"The crop box must be even, at least 16 and at most the particle box ({box} px); "
                              f"got {crop}.")
            if train is None or train < 16 or train % 2:
                errors.append(f"The training box must be even and at least 16; got {train}.")
            elif train > crop:
                errors.append(f"The training box ({train} px) is larger than the crop box ({crop} px): set it to "
                              f"{crop} px or less.")
        meshRun = src.meshRun.get()
        if meshRun is not None and box and apix:
            extent = meshRun.getMeshExtent()
            want = crop * apix
            if extent is not None and abs(extent - want) > MESH_EXTENT_TOLERANCE * want:
                errors.append(f"The mesh spans {extent:.1f} Å but the crop box spans {want:.1f} Å ({crop} px): "
                              f"set the mesh prep's crop box to {crop} px (or leave the mesh empty for an "
                              "automatic one).")
        if not self.doContinue.get():
            errors += self._validateInitComponents(parts)
        return errors

    def _validateScratch(self) -> list[str]:
        """Errors for a scratch folder that is a file or cannot be written here (a folder that does not exist here,
        or one named through $VARIABLES, is left to the machine that trains: the engine checks it before reading)."""
        folder = self._getScratchFolder()
        if not folder or "$" in folder:
            return []
        path = os.path.expanduser(folder)
        if os.path.exists(path) and not os.path.isdir(path):
            return [f"The scratch folder {folder} is a file: give a folder for the prepared-particles cache (or "
                    "leave it empty)."]
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            return [f"The scratch folder {folder} cannot be written: give a writable folder (or leave it empty)."]
        return []

    def _validateContinue(self) -> list[str]:
        """Errors for a continue request: a previous training run with a checkpoint and more epochs to go."""
        prev = self.continueRun.get()
        if prev is None:
            return ["Choose the training run to continue, or set 'Continue a previous training?' to No."]
        if not isinstance(prev, FlexPluginProtTrain):
            return [f"{prev.getRunName()} is not a 3D flex training run."]
        if prev.getObjId() == self.getObjId() and self.getObjId() is not None:
            return ["A run cannot continue itself: use Scipion's Continue instead."]
        if not os.path.exists(prev.getTrainFile("checkpoint")):
            return [f"{prev.getRunName()} has no checkpoint to continue from (did it train at least one epoch?)."]
        info = prev.getTrainInfo()
        total = (self.epochs.get() or 0) + (self.extraEpochs.get() or 0)
        if info is not None and info.get("epochs_done", 0) >= total:
            return [f"{prev.getRunName()} already trained {info['epochs_done']} epochs: ask for more (number of "
                    f"epochs + extra epochs, now {total}) to continue it."]
        return []

    def _validateInitComponents(self, parts) -> list[str]:
        """Errors when seeding latents from input coordinates that do not exist."""
        if not self.initFromInput.get():
            return []
        comps = self._getInitComponents()
        if comps is None:
            return [f"Input components to use must be component numbers from 1, e.g. '1 2'; got "
                    f"'{self.initComponents.get()}'."]
        if not isinstance(parts, SetOfParticlesFlex):
            return []  # nothing to seed from: training starts from random latents
        first = parts.getFirstItem()
        # getZFlex() cannot parse an unset zFlex: look at the stored CSV text first
        m = len(first.getZFlex()) if first is not None and first._zFlex.get() else 0
        k = self.numberOfLatents.get() or 0
        if m == 0:
            return ["The input particles carry no latent coordinates: set 'Initialize latents from input?' to No."]
        if comps:
            errors = []
            if len(comps) != k:
                errors.append(f"Give one input component per latent dimension: {k} needed, got {len(comps)}.")
            if max(comps) > m or min(comps) < 1 or len(set(comps)) != len(comps):
                errors.append(f"Input components {comps} must be distinct numbers from 1 to {m} (the input "
                              f"particles have {m} coordinates).")
            return errors
        if m < k:
            return [f"The input particles have {m} coordinates, fewer than the {k} latent dimensions: lower the "
                    "number of latent dims, or set 'Initialize latents from input?' to No."]
        return []

    def _summary(self) -> list[str]:
        info = self.getTrainInfo()
        if info is None or not self.hasAttribute(outputs.outputParticles.name):
            return ["Output not ready yet."]
        lines = [f"Trained {info['epochs_done']} epochs in {info['seconds'] / 60:.1f} min on {info['particles']} "
                 f"particles: K = {info['k']} latent dims, training box {info['train_box']} px "
                 f"({info['apix_train']:.3f} Å/px) from a {info['crop']} px crop.",
                 f"Largest flow displacement (particle {info['particle_furthest_along_latent0']}, furthest along "
                 f"latent 1): {info['max_displacement_A']:.2f} Å."]
        if self.doContinue.get() and self.continueRun.get() is not None:
            lines.append(f"Continued from {self.continueRun.get().getRunName()}.")
        return lines

    def _methods(self) -> list[str]:
        info = self.getTrainInfo()
        if info is None:
            return []
        src = self._getSettingsSource()
        return [f"3D Flex [Punjani2023] was trained with flexplugin's PyTorch implementation on {info['particles']} "
                f"particles cropped to {info['crop']} px and downsampled to {info['train_box']} px "
                f"({info['apix_train']:.3f} Å/px), with {info['k']} latent dimensions, a flow generator of "
                f"{src.layers.get()} layers × {src.hiddenUnits.get()} units, rigidity weight {src.rigidity.get():g} "
                f"and {info['epochs_done']} epochs."]

    def _citations(self) -> list[str]:
        return ["Punjani2023"]

    # --------------------------- UTILS functions -----------------------------
    def _getSettingsSource(self) -> FlexPluginProtTrain:
        """The run whose inputs and model settings apply: the first run of a chain of continues."""
        prev = self.continueRun.get() if self.doContinue.get() else None
        return prev._getSettingsSource() if isinstance(prev, FlexPluginProtTrain) else self

    def _getInputParticles(self, pointer: bool = False):
        """The particles being trained: this run's input, or the input of the run being continued."""
        src = self._getSettingsSource()
        if src is self:
            return super()._getInputParticles(pointer)
        return src._getInputParticles(pointer)

    def _getParticleBox(self) -> int | None:
        parts = self._getInputParticles()
        return parts.getXDim() if parts is not None else None

    def _getCropBox(self) -> int | None:
        """The crop box in px (the particle box when no crop is given)."""
        crop = self.cropBox.get()
        return crop if crop else self._getParticleBox()

    def _getTrainDir(self, *paths: str) -> str:
        return self._getExtraPath("train", *paths)

    def _getAutoMeshDir(self, *paths: str) -> str:
        return self._getExtraPath("mesh", *paths)

    def _getInitLatentsFile(self) -> str:
        return self._getExtraPath("input", "init_latents.csv")

    def _needsOwnMesh(self) -> bool:
        return not self.doContinue.get() and self.meshRun.get() is None

    def _getInitComponents(self) -> list[int] | None:
        """The 1-based input components from the form ([] = the first K); None when unreadable."""
        text = (self.initComponents.get() or "").strip()
        if not text:
            return []
        words = [w for w in re.split(r"[,;\s]+", text) if w]
        return [int(w) for w in words] if all(w.isdigit() for w in words) else None

    def _seedsLatents(self) -> bool:
        """True when a fresh run starts its latents from the input's zFlex coordinates."""
        return (not self.doContinue.get() and bool(self.initFromInput.get())
                and isinstance(self._getInputParticles(), SetOfParticlesFlex))

    def _writeInitLatents(self, path: str) -> str:
        """The input particles' zFlex as the engine's latents file (by particle id), to seed flex-train."""
        n, width = writeZFlexLatents(self._getInputParticles(), path)
        self.info(f"Wrote {n} initial latents ({width} coordinates each) to {path}")
        return path

    def _getMeshFile(self) -> str:
        """The mesh this run trains with: the mesh prep run's, the automatic one, or the continued run's."""
        src = self._getSettingsSource()
        if src is not self:
            return src._getMeshFile()
        meshRun = self.meshRun.get()
        return meshRun.getMeshFile() if meshRun is not None else self._getAutoMeshDir(MESH_FILES["mesh"])

    def getMeshFiles(self) -> dict[str, str]:
        """Files of the mesh used (mesh.pkl, mesh.pdb, mesh_slices.png, mesh.json, mesh_mask.mrc)."""
        folder = os.path.dirname(self._getMeshFile())
        return {k: os.path.join(folder, v) for k, v in MESH_FILES.items()}

    def _getAutoMeshArgs(self) -> list:
        """flex-mesh with its defaults over the consensus map (cropped by flex-mesh to the crop box when cropping)."""
        crop = self._getCropBox()

        def meshInput(attr: str) -> str | None:
            obj = getattr(self, attr).get()
            return plainFileName(obj.getFileName()) if obj is not None else None

        return meshEngineArgs(meshInput(INPUT_VOLUME), self._getAutoMeshDir(), mask=meshInput(INPUT_MASK),
                              crop=crop if crop != self._getParticleBox() else None)

    def _getTrainArgs(self) -> list:
        """The `flexplugin flex-train` argument list: settings of the source run, epochs of this one (the options
        of TrainConfig's fields through engineArgs, in the order runs have always had, so Continue sees no change)."""
        src = self._getSettingsSource()
        args = ["--particles", self._getInputStarFile(),
                "--volume", plainFileName(getattr(src, INPUT_VOLUME).get().getFileName()),
                "--mesh", self._getMeshFile(),
                "--out", self._getTrainDir()]
        args += self._trainSettingArgs("k") + engineArgs(PrepConfig, {"train_box": src.trainingBox.get(),
                                                                     "crop": src.cropBox.get() or None})
        args += self._trainSettingArgs("layers", "hidden", "epochs", "extra_epochs", "batch_size", "lr_flow_init",
                                       "lr_flow_final", "lr_density", "rigidity", "latent_noise", "latent_prior",
                                       "latent_prior_pow", "seed")
        if src.hasAttribute("searchStart"):  # runs saved before the search options keep the engine's defaults
            args += self._trainSettingArgs("search_start", "search_every", "search_points", "search_kmax",
                                           "final_search")
        args += self._trainSettingArgs("lr_latent")  # empty: the engine's automatic step size
        if self._seedsLatents():
            args += ["--init-latents", self._getInitLatentsFile()]
            comps = self._getInitComponents()
            if comps:
                args += ["--init-idxs", ",".join(str(c - 1) for c in comps)]
        return args + self.getDeviceArgs() + self.getThreadsArgs() + self._getLoadingArgs()

    def _getLoadingArgs(self) -> list:
        """`--workers N` when not the engine's default and `--scratch DIR` for a scratch folder given on the form;
        nothing for the defaults, so the argument lists of earlier runs (Scipion's Continue) do not change.
        Scipion's scratch, the fallback, travels in the environment (getEngineEnviron)."""
        args: list = []
        workers = self.loaderWorkers.get()
        if workers is not None and workers != LOADER_WORKERS:
            args += ["--workers", workers]
        folder = self._getScratchFolder()
        if folder:
            args += ["--scratch", folder]
        return args

    def _getScratchFolder(self) -> str:
        """The form's scratch folder ('' when empty or when the cache is off)."""
        return (self.scratchFolder.get() or "").strip() if self.useScratch.get() else ""

    def _getScipionScratch(self) -> str | None:
        """This run's temporary folder on Scipion's scratch (SCIPION_SCRATCH), resolved to the scratch disk so that
        a node of a queue reaches it by its own path; None when Scipion has no scratch (tmp is then in the project)."""
        if not pw.Config.SCIPION_SCRATCH:
            return None
        tmp = self._getTmpPath()
        return os.path.realpath(tmp) if os.path.islink(tmp) else None

    def getEngineEnviron(self) -> dict:
        """The base environment, with the prepared-particles cache as the form asks: off removes the engine's
        ${SCRATCH_ENV}; an empty folder falls back to it when set, else to Scipion's scratch (given to the engine as
        ${SCRATCH_ENV}, so the step's arguments do not change with Scipion's configuration)."""
        env = super().getEngineEnviron()
        if not self.useScratch.get():
            env.pop(SCRATCH_ENV, None)
        elif not self._getScratchFolder() and not env.get(SCRATCH_ENV, "").strip():
            scratch = self._getScipionScratch()
            if scratch:
                env[SCRATCH_ENV] = scratch
        return env

    def _trainSettingArgs(self, *names: str) -> list:
        """flex-train's options for these TrainConfig fields, from the form (TRAIN_FORM): the epochs from this run,
        the other settings from the run whose settings apply (`_getSettingsSource`)."""
        src = self._getSettingsSource()
        return engineArgs(TrainConfig, {name: getattr(self if name in THIS_RUN else src, TRAIN_FORM[name]).get()
                                        for name in names})

    def getThreadsArgs(self) -> list[str]:
        """`--threads N` with the run's Scipion threads, always: torch's default (every core) oversubscribes
        shared or queued machines, and CPU training is several times slower then."""
        return ["--threads", str(max(1, self.numberOfThreads.get() or 1))]

    def _makeFlexInfo(self, info: dict) -> FlexInfo:
        """Set-level FlexInfo: where the model, checkpoint and mesh are and how the data were prepared."""
        flexInfo = FlexInfo(FLEX_PROGNAME)
        flexInfo.setAttr("modelPath", self.getTrainFile("model"))
        flexInfo.setAttr("checkpointPath", self.getTrainFile("checkpoint"))
        flexInfo.setAttr("meshPath", self._getMeshFile())
        flexInfo.setAttr("latentDim", int(info["k"]))
        flexInfo.setAttr("trainingBox", int(info["train_box"]))
        flexInfo.setAttr("cropBox", int(info["crop"]))
        flexInfo.setAttr("trainingSamplingRate", float(info["apix_train"]))
        flexInfo.setAttr("epochs", int(info["epochs_done"]))
        return flexInfo

    def getTrainFile(self, role: str) -> str:
        """A file flex-train writes, by role (constants.TRAIN_FILES: model, checkpoint, info, canonical, latents,
        latents_npy, particles)."""
        return self._getTrainDir(TRAIN_FILES[role])

    def getTrainInfo(self) -> dict | None:
        """flex-train's train.json (epochs_done, seconds, k, train_box, apix_train, crop, ...) or None."""
        return readJsonFile(self.getTrainFile("info"))

    def getPlotFiles(self) -> dict[str, str]:
        """The diagnostics flex-train draws: latents, activations, flow, losses (PNG)."""
        return {name: self._getTrainDir(f"{name}.png") for name in TRAIN_PLOTS}
