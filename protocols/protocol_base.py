"""The base of every flexplugin protocol: GPU parameters, engine calls, particle export and input checks.

Subclasses define their form and steps; heavy work always goes through `runEngine` (Scipion's runJob
running `python -m flexplugin.cli <subcommand> ...`), never in the protocol's own process.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess

import numpy as np

import pyworkflow as pw
import pyworkflow.protocol.params as params
from pwem.objects import FlexInfo, SetOfParticlesFlex
from pwem.protocols import EMProtocol
from pyworkflow.protocol import Protocol
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU
from pyworkflow.protocol.params import PARALLELIZATION

from flexplugin import Plugin
from flexplugin.cli import DISTRIBUTED_COMMANDS
from flexplugin.engine.errors import EXIT_DISK_FULL
from flexplugin.engine.flex.mesh_config import MeshConfig
from flexplugin.engine.options import option_args
from flexplugin.engine.va3d_config import VA3DConfig
from flexplugin.launch import TORCHRUN_MODULE

from .constants import FLEX_PROGNAME, INPUT_TRAINING

# attribute names of the inputs the shared checks know about
INPUT_PARTICLES = "inputParticles"
INPUT_VOLUME = "inputVolume"
INPUT_MASK = "inputMask"
GPU_PLACEHOLDER = "%(GPU)s"  # replaced by Scipion with the GPU id given to the step
CPU_FALLBACK = "allowCpuFallback"  # the form field; the engine reads it as FLEXPLUGIN_CPU_FALLBACK
CPU_FALLBACK_ENV = "FLEXPLUGIN_CPU_FALLBACK"
# particle attributes (set columns) whose values the engine refuses when missing, NaN, infinite or not positive
DEFOCUS_LABELS = (("_ctfModel._defocusU", "defocus U"), ("_ctfModel._defocusV", "defocus V"))
VOLTAGE_LABEL = "_acquisition._voltage"
MATRIX_LABEL = "_transform._matrix"
LISTED_IDS = 5  # particle ids named in an error
COUNTED_IDS = 1000  # bad particles counted at most (the rest is "or more")
VA3D = VA3DConfig()  # the Butterworth filter defaults of the 3DVA forms are 3DVA's, declared there once
MESH = MeshConfig()  # flex-mesh's defaults (the automatic mesh of the training protocol uses them)


def _positive(value) -> bool:
    """A finite number above 0 (None, NaN and Inf are not)."""
    return value is not None and math.isfinite(value) and value > 0


def _badParticleIds(parts, where: str, test) -> list[int]:
    """Ids of the particles matching `where` (an SQL condition over set columns, by attribute name), at most
    COUNTED_IDS. Where the set's storage cannot run the condition, `test(particle)` decides in a loop instead."""
    try:
        return [int(p.getObjId()) for p in parts.iterItems(where=where, limit=COUNTED_IDS)]
    except Exception:  # noqa: BLE001 - not an SQLite set: look at every particle
        bad = []
        for p in parts.iterItems():
            if test(p):
                bad.append(int(p.getObjId()))
                if len(bad) == COUNTED_IDS:
                    break
        return bad


def _allPositive(parts, label: str, complete: bool = True) -> bool:
    """Whether every stored value of `label` is a positive finite number (and, with `complete`, every particle has
    one), by SQL aggregates; False when the set cannot tell (then the caller looks at each particle)."""
    try:
        stats = parts.aggregate(["MIN", "MAX", "COUNT"], label)[0]
    except Exception:  # noqa: BLE001 - no such column, or not an SQLite set
        return False
    if complete and stats["COUNT"] != parts.getSize():
        return False
    return not stats["COUNT"] or (_positive(stats["MIN"]) and _positive(stats["MAX"]))


def _idsText(ids: list[int]) -> str:
    """'particle 4 has', '3 particles (ids 4, 9, 12) have' or '1000 or more particles (ids 4, ...) have'."""
    if len(ids) == 1:
        return f"particle {ids[0]} has"
    n = f"{len(ids)} or more" if len(ids) >= COUNTED_IDS else str(len(ids))
    shown = ", ".join(str(i) for i in ids[:LISTED_IDS]) + (", ..." if len(ids) > LISTED_IDS else "")
    return f"{n} particles (ids {shown}) have"


def particleValueErrors(parts, ctf: bool = True) -> list[str]:
    """Errors for CTF and pose values the engine refuses (flexplugin/engine/io.py COLUMN_RULES): a defocus or
    voltage that is missing, NaN, infinite or not positive, and a pose matrix holding NaN or Inf.

    SQL aggregates and conditions over the set find them in milliseconds (no loop over a million particles), so
    such a set cannot start a run: one NaN defocus used to give an all-zero map. SQLite stores NaN as NULL, so a
    missing value counts as bad (for the voltage, a particle without one uses the set's)."""
    errors = []
    if ctf:
        for label, name in DEFOCUS_LABELS:
            if _allPositive(parts, label):
                continue
            getter = "getDefocusU" if label.endswith("U") else "getDefocusV"
            ids = _badParticleIds(parts, f"{label}<=0 OR {label}>1e308 OR {label} IS NULL",
                                  lambda p, g=getter: p.getCTF() is None or not _positive(getattr(p.getCTF(), g)()))
            if ids:
                errors.append(f"The input {_idsText(ids)} a {name} that is missing, NaN, infinite or not positive: the "
                              "CTF needs a positive defocus in Å. Re-estimate the CTF or remove these particles "
                              "(e.g. with a subset).")
        if not _allPositive(parts, VOLTAGE_LABEL, complete=False):
            ids = _badParticleIds(parts, f"{VOLTAGE_LABEL}<=0 OR {VOLTAGE_LABEL}>1e308",
                                  lambda p: p.getAcquisition() is not None and p.getAcquisition().getVoltage()
                                  is not None and not _positive(p.getAcquisition().getVoltage()))
            if ids:
                errors.append(f"The input {_idsText(ids)} a voltage that is not a positive number of kV: fix the "
                              "acquisition of these particles.")
        setAcq = parts.getAcquisition()
        voltage = setAcq.getVoltage() if setAcq is not None else None
        if not _positive(voltage) and not _allPositive(parts, VOLTAGE_LABEL):  # particles without one use the set's
            errors.append(f"The particles' acquisition has no valid voltage ({voltage}): set it to the microscope's "
                          "voltage in kV.")
    if parts.hasAlignmentProj():
        ids = _badParticleIds(parts, f"{MATRIX_LABEL}>'' AND ({MATRIX_LABEL} LIKE '%nan%' OR "
                                     f"{MATRIX_LABEL} LIKE '%inf%')",
                              lambda p: p.getTransform() is not None
                              and not np.isfinite(p.getTransform().getMatrix()).all())
        if ids:
            errors.append(f"The input {_idsText(ids)} an alignment (pose) with NaN or infinite values: refine them "
                          "again or remove these particles (e.g. with a subset).")
    return errors


def _nvidiaPresent() -> bool:
    """Cheap guess of whether this machine has an NVIDIA GPU (no torch import in the GUI)."""
    return shutil.which("nvidia-smi") is not None


class FlexPluginProtBase(EMProtocol):
    """Shared logic of flexplugin protocols (hidden from the protocol tree)."""

    _label = None
    _devStatus = pw.BETA
    _requiresCTF = True  # engine jobs model the CTF; subclasses that do not can turn the check off

    # --------------------------- DEFINE param functions ----------------------
    def _defineGpuParams(self, form: params.Form) -> None:
        """GPU fields shown at the top of the form (`useGpu`, `gpuList`)."""
        form.addHidden(USE_GPU, params.BooleanParam, default=_nvidiaPresent(),
                       label="Use GPU?",
                       help="Run the engine on a GPU (CUDA). Set to No to run on the CPU.")
        form.addHidden(GPU_LIST, params.StringParam, default="0",
                       label="GPU ID",
                       help="The GPU to use (one id, as numbered by nvidia-smi). 3DVA, the 3DVA display's "
                            "reconstructions, 3D flex training and the flex reconstruction also take several ids "
                            "(e.g. 0 1 2 3): one process per GPU, started by torchrun (docs/distributed.md).")

    def _defineParticlesParam(self, form: params.Form, condition: str | None = None) -> None:
        """The input particles: a 3D-aligned set (ALIGN_PROJ) with CTF (shown when `condition` holds)."""
        form.addParam(INPUT_PARTICLES, params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", important=True, condition=condition,
                      label="Input particles",
                      help="Particles from a consensus 3D refinement: they need 3D alignment and CTF.")

    def _defineVolumeParam(self, form: params.Form, label: str = "Consensus volume",
                           help: str = "The consensus map of the input particles (same box and pixel size).",
                           allowsNull: bool = False, condition: str | None = None) -> None:
        """A volume matching the particles' box and pixel size (shown when `condition` holds)."""
        form.addParam(INPUT_VOLUME, params.PointerParam, pointerClass="Volume", allowsNull=allowsNull,
                      important=not allowsNull, condition=condition, label=label, help=help)

    def _defineMaskParam(self, form: params.Form, label: str = "Mask",
                         help: str = "A soft mask around the particle (values in [0, 1], same box and pixel "
                                     "size as the particles).",
                         allowsNull: bool = True, condition: str | None = None) -> None:
        """A mask matching the particles' box and pixel size (shown when `condition` holds)."""
        form.addParam(INPUT_MASK, params.PointerParam, pointerClass="VolumeMask", allowsNull=allowsNull,
                      important=not allowsNull, condition=condition, label=label, help=help)

    def _defineCpuFallbackParam(self, form: params.Form) -> None:
        """'Fall back to the CPU?' (expert), at the end of the last section of a form with GPU fields.

        Added after the subclass's `_defineParams` (see `_createVarsFromDefinition`), so every protocol with GPU
        fields gets it without defining it, in a tab the form shows (the GPU fields themselves are hidden)."""
        if not form.hasParam(USE_GPU) or form.hasParam(CPU_FALLBACK):
            return
        sections = [s for s in form.iterSections() if s.label.get() not in ("General", PARALLELIZATION)]
        if not sections:
            return
        sections[-1].addParam(CPU_FALLBACK, params.BooleanParam, default=True, expertLevel=params.LEVEL_ADVANCED,
                              label="Fall back to the CPU if the GPU is missing?",
                              help="When the GPU asked for does not exist on the machine that runs the job (no CUDA, "
                                   "or no GPU with that id), Yes runs the job on the CPU with a WARNING in the log "
                                   "(much slower); No stops the job with an error naming the GPUs present.")

    def _createVarsFromDefinition(self, **kwargs):
        """Scipion builds the attributes from the form here, right after `_defineParams`: add the shared
        CPU-fallback field first."""
        if hasattr(self, "_definition"):
            self._defineCpuFallbackParam(self._definition)
        super()._createVarsFromDefinition(**kwargs)

    # --------------------------- engine ---------------------------------------
    def getDeviceArgs(self) -> list[str]:
        """`--device cuda:<id>` for the step's GPU or `--device cpu`.

        The id is Scipion's `%(GPU)s` placeholder, which runJob replaces by the GPU given to the step (renumbered
        under queues), so engine steps using it must be inserted with needsGPU=True.
        """
        if self.usesGpu():  # several GPUs: each torchrun process takes its id from --gpus (flexplugin/launch.py)
            return ["--gpus", GPU_PLACEHOLDER] if self.usesSeveralGpus() else ["--device", f"cuda:{GPU_PLACEHOLDER}"]
        return ["--device", "cpu"]

    def allowsCpuFallback(self) -> bool:
        """Whether a missing GPU may run the engine on the CPU (the form's field; True when it has none)."""
        value = getattr(self, CPU_FALLBACK, None)
        return True if value is None or value.get() is None else bool(value.get())

    def getEngineEnviron(self) -> dict:
        """The engine's environment: the plugin's, plus FLEXPLUGIN_CPU_FALLBACK from the form.

        The fallback travels in the environment rather than the arguments so that step arguments (which decide
        what Scipion's Continue re-runs) do not change with it."""
        env = Plugin.getEnviron()
        env[CPU_FALLBACK_ENV] = "1" if self.allowsCpuFallback() else "0"
        if self.usesSeveralGpus():  # torchrun's rendezvous, unless a queue template set it (docs/distributed.md)
            for name, value in TORCHRUN_LOCAL_RDZV.items():
                env.setdefault(name, value)
        return env

    def getThreadsArgs(self) -> list[str]:
        """`--threads N` when the protocol was given more than one thread."""
        n = self.numberOfThreads.get()
        return ["--threads", str(n)] if n and n > 1 else []

    def runEngine(self, subcommand: str, args: list) -> None:
        """Run one `flexplugin` CLI subcommand through Scipion's runJob (queues, GPU ids, logs).

        runJob hands the command line to a shell: each argument is shell-quoted, so paths with spaces and
        values such as a fuse list '1>3, 1>4' arrive intact (plain words and the `%(GPU)s` placeholder are
        unaffected: Scipion substitutes the placeholder inside the quotes).
        """
        program, line = engineCommandLine(subcommand, args, len(self.getGpuList()) if self.usesSeveralGpus() else 1)
        logs = [self.getStderrLog(), self.getStdoutLog()]
        starts = [os.path.getsize(p) if os.path.exists(p) else 0 for p in logs]
        try:
            self.runJob(program, line, env=self.getEngineEnviron(), numberOfMpi=1)
        except subprocess.CalledProcessError as e:
            message = next((m for m in map(self._engineError, logs, starts) if m), None)
            if message is None:
                raise
            if e.returncode == EXIT_DISK_FULL:  # the engine's advice is for the command line; say Scipion's way
                message += (" In Scipion: free space on the project's disk, then Continue this run (finished "
                            "steps, checkpoints and earlier outputs are kept).")
            raise RuntimeError(f"flexplugin {subcommand} failed (exit status {e.returncode}): {message}") from e

    @staticmethod
    def _engineError(logPath: str, start: int = 0) -> str | None:
        """The engine's last `error: …` line written to `logPath` after byte `start` (None if there is none),
        so the protocol's error shows the engine's message (NaN images, disk full, missing GPU) itself."""
        try:
            with open(logPath, "rb") as fh:
                fh.seek(start)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error: ")]
        # under torchrun the processes stopped after a failure say so last: the failure's own line is the message
        lines = [ln for ln in lines if STOPPED_NOTICE not in ln] or lines
        return lines[-1][len("error: "):] if lines else None

    # --------------------------- particles -------------------------------------
    def _getInputParticles(self, pointer: bool = False):
        """The input particle set (or its pointer); None when the protocol has no particle input."""
        ptr = getattr(self, INPUT_PARTICLES, None)
        if ptr is None:
            return None
        return ptr if pointer else ptr.get()

    def _getInputStarFile(self) -> str:
        """Where the input particles are written for the engine."""
        return self._getExtraPath("input", "particles.star")

    def getExtraFile(self, *paths: str) -> str:
        """A file in this run's extra folder, for viewers (e.g. where they write their ChimeraX scripts)."""
        return self._getExtraPath(*paths)

    def writeInputParticles(self, partSet=None, starPath: str | None = None) -> str:
        """Write the input particles (ids, poses, CTF, optics) as the engine's STAR; returns its path.

        Stacks in formats other than MRC are converted to .mrcs next to the STAR file.
        """
        from flexplugin import convert
        partSet = partSet if partSet is not None else self._getInputParticles()
        starPath = starPath or self._getInputStarFile()
        stacksDir = self._getExtraPath("input", "stacks")
        n = convert.writeSetOfParticles(partSet, starPath, outputDir=stacksDir,
                                        requireAlignment=True, requireCTF=self._requiresCTF)
        self.info(f"Wrote {n} particles to {starPath}")
        return starPath

    # --------------------------- INFO functions --------------------------------
    def _validate(self) -> list[str]:
        """Shared checks: 3D-aligned, CTF'd, non-empty particles; volume and mask match them; one GPU."""
        errors = []
        parts = self._getInputParticles()  # a missing required input is reported by Scipion's form checks
        if parts is not None:
            errors += self._validateParticles(parts)
        for attr, name in ((INPUT_VOLUME, "volume"), (INPUT_MASK, "mask")):
            ptr = getattr(self, attr, None)
            obj = ptr.get() if ptr is not None else None
            if obj is not None and parts is not None:
                errors += self._validateMatchesParticles(obj, parts, name)
        errors += self._validateGpu()
        return errors

    def _validateParticles(self, parts) -> list[str]:
        """Errors for a particle set the engine cannot use: empty, without 3D alignment, CTF or sampling rate, or
        with CTF or pose values the engine refuses (particleValueErrors)."""
        errors = []
        if parts.getSize() == 0:
            errors.append("The input particle set is empty.")
        if not parts.hasAlignmentProj():
            errors.append("The input particles have no 3D alignment (ALIGN_PROJ): use particles from a 3D "
                          "refinement.")
        if self._requiresCTF and not parts.hasCTF():
            errors.append("The input particles have no CTF: estimate the CTF before extracting particles.")
        apix = parts.getSamplingRate()
        if not apix or apix <= 0:
            errors.append("The input particles have no sampling rate.")
        if not errors:
            errors += particleValueErrors(parts, ctf=self._requiresCTF)
        return errors

    def _validateMatchesParticles(self, obj, parts, name: str) -> list[str]:
        """Errors when a volume or mask differs from the particles in box or pixel size."""
        errors = []
        box, apix = parts.getXDim(), parts.getSamplingRate()
        dim = obj.getDim()
        if dim is None:
            return [f"Cannot read the {name} file {obj.getFileName()}."]
        if len(set(dim)) != 1:
            errors.append(f"The {name} must be cubic, it is {dim[0]}x{dim[1]}x{dim[2]}.")
        if box and dim[0] != box:
            errors.append(f"The {name} is {dim[0]} voxels wide but the particles are {box} px: resize one of "
                          "them so the boxes match.")
        vapix = obj.getSamplingRate()
        if apix and vapix and abs(vapix - apix) > 1e-3 * apix:
            errors.append(f"The {name} has pixel size {vapix:.4f} Å but the particles have {apix:.4f} Å.")
        return errors

    def _validateGpu(self) -> list[str]:
        """One GPU id, or several for a protocol whose job runs data-parallel (SEVERAL_GPU_JOBS)."""
        if not (self.allowsGpu() and self.usesGpu()):
            return []
        if not self.getGpuList():
            return ["Give a GPU id."]
        if len(set(self.getGpuList())) != len(self.getGpuList()):
            return ["A GPU id is given twice: one process per GPU."]
        if self.usesSeveralGpus() and not self.allowsSeveralGpus():
            return ["This flexplugin job runs on one GPU: give a single GPU id."]
        return []

    def usesSeveralGpus(self) -> bool:
        """Whether the form gives this protocol's GPU steps more than one GPU id."""
        return bool(self.allowsGpu() and self.usesGpu() and len(self.getGpuList()) > 1)

    def allowsSeveralGpus(self) -> bool:
        """Whether this protocol's engine job runs data-parallel, one torchrun process per GPU."""
        return SEVERAL_GPU_JOBS.get(type(self).__name__) in DISTRIBUTED_COMMANDS


# --------------------------- shared pieces of several protocols --------------------------------------------------
def readJsonFile(path: str) -> dict | None:
    """The JSON an engine command wrote (run.json, train.json, mesh.json, ...), or None while it does not exist."""
    if not path or not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def engineArgs(cfgClass: type, values: dict) -> list:
    """The engine options setting fields of a settings dataclass (e.g. TrainConfig) from a form: `values` maps
    field names to form values, in the order wanted; None keeps the engine's default, a boolean that is off gives
    `--no-<name>` (flexplugin/engine/options.py: the option names come from the fields, declared once there)."""
    return option_args(cfgClass, values)


def meshEngineArgs(volume: str, outDir: str, mask: str | None = None, cells: int = MESH.cells,
                   rigidityMin: float = MESH.rigidity_min, stiffenLowDensity: bool = MESH.stiffen_low_density,
                   segmentation: str | None = None, fuse: str = "", rigid: str = "", maskLowpass: float | None = None,
                   maskThreshold: float | None = None, maskDilate: float | None = None,
                   maskPad: float | None = None, crop: int | None = None) -> list:
    """The `flexplugin flex-mesh` argument list (options left as None keep the engine's defaults, MeshConfig's;
    `crop`: the engine crops the map, mask and segmentation about their centre to this box before meshing)."""
    args = ["--volume", volume, "--out", outDir] + engineArgs(MeshConfig, {"cells": cells, "rigidity_min": rigidityMin})
    if crop:
        args += ["--crop", crop]
    if mask:
        args += ["--mask", mask]
    args += engineArgs(MeshConfig, {"stiffen_low_density": stiffenLowDensity})
    if segmentation:
        args += ["--segmentation", segmentation]
        if fuse and fuse.strip():
            args += ["--fuse", fuse.strip()]
        if rigid and rigid.strip():
            args += ["--rigid", rigid.strip()]
    if not mask:
        args += engineArgs(MeshConfig, {"mask_lowpass": maskLowpass, "mask_threshold": maskThreshold,
                                        "mask_dilate": maskDilate, "mask_pad": maskPad})
    return args


class FlexModelInput:
    """A trained 3D Flex model as protocol input: a 3D flex training run or its SetOfParticlesFlex."""

    def _defineTrainingParam(self, form: params.Form) -> None:
        """The `inputTraining` pointer (a training run or its output particles)."""
        form.addParam(INPUT_TRAINING, params.PointerParam, pointerClass="FlexPluginProtTrain,SetOfParticlesFlex",
                      important=True,
                      label="3D flex training",
                      help="A finished '3D flex training' run, or the particles it produced (a SetOfParticlesFlex "
                           "made by flexplugin's 3D flex training: its FlexInfo points at the trained model).")

    def getTrainingParticles(self) -> SetOfParticlesFlex | None:
        """The training's particles with latents (None before the training has finished)."""
        obj = getattr(self, INPUT_TRAINING).get()
        if isinstance(obj, Protocol):  # the form only admits a training run here
            return getattr(obj, "outputParticles", None)
        return obj if isinstance(obj, SetOfParticlesFlex) else None

    def getTrainingFlexInfo(self) -> FlexInfo | None:
        """The set-level FlexInfo of the training's particles."""
        parts = self.getTrainingParticles()
        return parts.getFlexInfo() if parts is not None else None

    def getModelPath(self) -> str | None:
        """model.pt of the training (project-relative), from the FlexInfo."""
        info = self.getTrainingFlexInfo()
        return info.getAttr("modelPath") if info is not None and hasattr(info, "modelPath") else None

    def getLatentDim(self) -> int | None:
        """K, the number of latent dimensions of the model."""
        info = self.getTrainingFlexInfo()
        return int(info.getAttr("latentDim")) if info is not None and hasattr(info, "latentDim") else None

    def getTrainingRunName(self) -> str:
        """The name of the run given as input, or that produced the particles given, for summaries."""
        ptr = getattr(self, INPUT_TRAINING)
        owner = ptr.getObjValue()
        if isinstance(owner, Protocol):
            return owner.getRunName() + (f" ({ptr.getExtended()})" if ptr.hasExtended() else "")
        obj = ptr.get()
        return (obj.getObjLabel() or "the input particles") if obj is not None else "?"

    def _validateTraining(self) -> list[str]:
        """Errors for an input that is not a finished flexplugin 3D flex training."""
        if getattr(self, INPUT_TRAINING).get() is None:
            return ["Choose a 3D flex training run or its output particles."]
        parts = self.getTrainingParticles()
        if parts is None:
            return [f"{self.getTrainingRunName()} has no output particles yet: wait until the training has "
                    "finished."]
        prog = parts.getFlexInfo().getProgName()
        if prog != FLEX_PROGNAME:
            return [f"The input particles were made by '{prog or 'unknown'}', not by flexplugin's 3D flex "
                    "training: choose a '3D flex training' run or its output particles."]
        model = self.getModelPath()
        if not model or not os.path.exists(model):
            return [f"The trained model {model} does not exist: did the training run finish (or was it deleted)?"]
        return []


class ButterworthFilterParams:
    """The Butterworth low-/high-pass fields of the 3DVA forms (cryoSPARC's var_filter_* and var_highpass_*)
    and their checks and engine options: `filterRes`, `filterOrder`, `highpassRes`, `highpassOrder`."""

    def _defineButterworthParams(self, form: params.Form, lowpassLabel: str, lowpassHelp: str, highpassLabel: str,
                                 highpassHelp: str, orderLabels: tuple[str, str], required: bool = False) -> None:
        """The four fields; `required` marks the low-pass resolution important (3DVA needs one)."""
        form.addParam("filterRes", params.FloatParam, default=None, allowsNull=True, important=required,
                      label=lowpassLabel, help=lowpassHelp)
        form.addParam("filterOrder", params.FloatParam, default=VA3D.filter_order, expertLevel=params.LEVEL_ADVANCED,
                      label=orderLabels[0],
                      help="Order of the Butterworth low-pass (cryoSPARC: var_filter_order, default "
                           f"{VA3D.filter_order:g}; "
                           "dimensionless, higher is sharper).")
        form.addParam("highpassRes", params.FloatParam, default=None, allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED, label=highpassLabel, help=highpassHelp)
        form.addParam("highpassOrder", params.FloatParam, default=VA3D.highpass_order,
                      expertLevel=params.LEVEL_ADVANCED,
                      label=orderLabels[1],
                      help="Order of the Butterworth high-pass (cryoSPARC: var_highpass_order, default "
                           f"{VA3D.highpass_order:g}; "
                           "dimensionless).")

    def _validateFilterOrders(self) -> list[str]:
        """Errors for filter orders that are not positive."""
        errors = []
        for attr, label in (("filterOrder", "filter order"), ("highpassOrder", "highpass order")):
            value = getattr(self, attr).get()
            if value is None or value <= 0:
                errors.append(f"The {label} must be positive.")
        return errors


# --------------------------- several GPUs: one engine job through torchrun (docs/distributed.md) -----------------
# the engine job of each protocol that may run on several GPUs (only while the CLI runs that job data-parallel)
SEVERAL_GPU_JOBS = {"FlexPluginProt3DVA": "3dva", "FlexPluginProt3DVADisplay": "3dva-display",
                    "FlexPluginProtTrain": "flex-train", "FlexPluginProtReconstruct": "flex-reconstruct"}
# torchrun's rendezvous on one node (what its --standalone sets), given as torchrun's PET_* environment defaults
# so that a queue template can replace them with a rendezvous across nodes
TORCHRUN_LOCAL_RDZV = {"PET_NNODES": "1", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "localhost:0"}
# a command that starts torchrun once per node (a SLURM template sets "srun --ntasks-per-node=1 ..."); unset on a
# workstation, where torchrun simply runs
SRUN_ENV = "FLEXPLUGIN_SRUN"
STOPPED_NOTICE = "was stopped (SIGTERM from torchrun"  # the error line of a process torchrun stopped (engine/distributed.py)


def engineCommandLine(subcommand: str, args: list, gpus: int = 1) -> tuple[str, str]:
    """Scipion runJob's program and argument line for `flexplugin <subcommand> <args>`: the CLI itself, or for
    `gpus` > 1 torchrun (torch.distributed.run) starting one CLI process per GPU on each node.

    Each argument is shell-quoted (runJob hands the line to a shell); Scipion's %(GPU)s placeholder inside
    the quotes still becomes the step's GPU ids. '--' ends torchrun's own options (flexplugin/launch.py). The
    torchrun command starts with ${FLEXPLUGIN_SRUN}, empty unless a queue template sets it to run torchrun on
    every node of the job (docs/distributed.md)."""
    words = [subcommand] + [str(a) for a in args]
    if gpus <= 1 or subcommand not in DISTRIBUTED_COMMANDS:
        return Plugin.getProgram(), " ".join(shlex.quote(w) for w in words)
    program = f"${{{SRUN_ENV}}} {Plugin.getPython()} -m {TORCHRUN_MODULE}"
    line = [f"--nproc-per-node={gpus}", "-m", "flexplugin.cli", "--", *words]
    return program, " ".join(shlex.quote(w) for w in line)
