"""The base of every flexplugin protocol: GPU parameters, engine calls, particle export and input checks.

Subclasses define their form and steps; heavy work always goes through `runEngine` (Scipion's runJob
running `python -m flexplugin.cli <subcommand> ...`), never in the protocol's own process.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pyworkflow as pw
import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU
from pyworkflow.protocol.params import PARALLELIZATION
from pwem.protocols import EMProtocol

from flexplugin import Plugin
from flexplugin.engine.errors import EXIT_DISK_FULL

# attribute names of the inputs the shared checks know about
INPUT_PARTICLES = "inputParticles"
INPUT_VOLUME = "inputVolume"
INPUT_MASK = "inputMask"
GPU_PLACEHOLDER = "%(GPU)s"  # replaced by Scipion with the GPU id given to the step
CPU_FALLBACK = "allowCpuFallback"  # the form field; the engine reads it as FLEXPLUGIN_CPU_FALLBACK
CPU_FALLBACK_ENV = "FLEXPLUGIN_CPU_FALLBACK"


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
                       help="The GPU to use (one id, as numbered by nvidia-smi). Each flexplugin job runs on "
                            "one GPU.")

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
        if self.usesGpu():
            return ["--device", f"cuda:{GPU_PLACEHOLDER}"]
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
        words = [subcommand] + [shlex.quote(str(a)) for a in args]
        logs = [self.getStderrLog(), self.getStdoutLog()]
        starts = [os.path.getsize(p) if os.path.exists(p) else 0 for p in logs]
        try:
            self.runJob(Plugin.getProgram(), " ".join(words), env=self.getEngineEnviron(), numberOfMpi=1)
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
        """Errors for a particle set the engine cannot use."""
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
        """Each engine job runs on one device: at most one GPU id."""
        if self.allowsGpu() and self.usesGpu() and len(self.getGpuList()) != 1:
            return ["flexplugin runs each job on one GPU: give a single GPU id."]
        return []

