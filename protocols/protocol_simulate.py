"""Simulate flexible particles: flexplugin's built-in three-domain object, imaged like real data.

Outputs real Scipion objects (3D-aligned, CTF'd particles, the consensus map and a soft mask) so that the
rest of a workflow, and the tests, can run on data with a known motion.
"""
from __future__ import annotations

import os
from enum import Enum

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import SetOfParticles, Volume, VolumeMask

from flexplugin.engine.simulate_config import SimConfig

from .protocol_base import FlexPluginProtBase

S = SimConfig()  # every simulation default is declared there, once


class outputs(Enum):
    outputParticles = SetOfParticles
    outputVolume = Volume
    outputMask = VolumeMask


class FlexPluginProtSimulate(FlexPluginProtBase):
    """Simulates particles of a flexible object (a core, a hinged arm and a twisting head) with random
    3D orientations, shifts, astigmatic CTFs and Gaussian noise, plus the consensus map and a soft mask.
    The ground-truth motion of each particle is written to extra/data/ground_truth.csv (by particle id)."""

    _label = "simulate flexible particles"
    _possibleOutputs = outputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Simulation")
        form.addParam("numberOfParticles", params.IntParam, default=S.n,
                      validators=[params.GE(2, "Simulate at least 2 particles")],
                      label="Number of particles",
                      help="How many particles to simulate (default 2,000). Each gets a random pose, shift, defocus "
                           "and motion state t in [-1, 1]; 1,000–2,000 are enough for 3DVA and 3D Flex to find the "
                           "motion at the default SNR, fewer make a quick smoke test.")
        form.addParam("boxSize", params.IntParam, default=S.box,
                      validators=[params.GE(16, "The box must be at least 16 px")],
                      label="Box size (px)",
                      help="Particle box in pixels: even, at least 16 (default 64). The object fills about half the "
                           "box; larger boxes cost time and memory roughly as box³ in the downstream jobs.")
        form.addParam("pixelSize", params.FloatParam, default=S.apix, validators=[params.Positive],
                      label="Pixel size (Å)",
                      help="Sampling rate in Å per pixel (default 2.0). It sets the physical size of the object "
                           "(box × pixel size) and the Nyquist limit (2 × pixel size) of every map.")
        form.addParam("snr", params.FloatParam, default=S.snr, validators=[params.Positive],
                      label="Signal-to-noise ratio",
                      help="Variance of the CTF-modulated projections over the variance of the noise.")
        form.addParam("hingeAmplitude", params.FloatParam, default=S.hinge_deg,
                      label="Hinge amplitude (deg)",
                      help="Swing of the arm about its hinge at the ends of the motion (t = ±1).")
        form.addParam("twistAmplitude", params.FloatParam, default=S.twist_deg,
                      label="Twist amplitude (deg)",
                      help="Twist of the head about the arm's axis at the ends of the motion (t = ±1).")
        form.addParam("seed", params.IntParam, default=S.seed, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed",
                      help="Seed of every random draw (poses, CTFs, motion states, noise); the same seed and "
                           "settings give bit-identical particles. Change it to draw an independent data set.")
        form.addParam("stackSize", params.IntParam, default=S.stack_size, expertLevel=params.LEVEL_ADVANCED,
                      validators=[params.Positive], label="Images per stack file",
                      help="Particles per .mrcs file (default 1,000). Smaller values split the data over several "
                           "stacks, as real extraction jobs do (one stack per micrograph).")

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.simulateStep, self._getSimulateArgs(), needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def simulateStep(self, args: list[str]) -> None:
        """Run `flexplugin simulate` into extra/data (from scratch: a rerun replaces old files)."""
        pwutils.cleanPath(self._getDataDir())
        self.runEngine("simulate", args)

    def createOutputStep(self) -> None:
        """Register the simulated particles (ids = STAR rlnImageId), the consensus map and the mask."""
        from flexplugin import convert
        parts = self._createSetOfParticles()
        convert.readSetOfParticles(self._getDataDir("particles.star"), parts, relativeTo=os.getcwd())
        apix = parts.getSamplingRate()

        vol = Volume()
        vol.setFileName(self._getDataDir("consensus.mrc"))
        vol.setSamplingRate(apix)
        mask = VolumeMask()
        mask.setFileName(self._getDataDir("mask.mrc"))
        mask.setSamplingRate(apix)

        self._defineOutputs(**{outputs.outputParticles.name: parts,
                               outputs.outputVolume.name: vol,
                               outputs.outputMask.name: mask})

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        errors = super()._validate()
        box = self.boxSize.get()
        if box is not None and box % 2:
            errors.append(f"The box size must be even, got {box}.")
        return errors

    def _summary(self) -> list[str]:
        if not self.hasAttribute(outputs.outputParticles.name):
            return ["Output not ready yet."]
        parts = getattr(self, outputs.outputParticles.name)
        return [f"{parts.getSize()} particles, box {self.boxSize.get()} px, "
                f"{parts.getSamplingRate():.3f} Å/px, SNR {self.snr.get():g}.",
                f"Motion: hinge ±{self.hingeAmplitude.get():g}°, twist ±{self.twistAmplitude.get():g}°; "
                f"ground truth per particle id in {self._getDataDir('ground_truth.csv')}."]

    def _methods(self) -> list[str]:
        if not self.hasAttribute(outputs.outputParticles.name):
            return []
        return [f"We simulated {self.numberOfParticles.get()} particles (box {self.boxSize.get()} px, "
                f"{self.pixelSize.get():g} Å/px, SNR {self.snr.get():g}) of a three-domain object whose arm "
                f"swings by up to {self.hingeAmplitude.get():g}° about a hinge while its head twists by up to "
                f"{self.twistAmplitude.get():g}°, with random orientations, shifts and astigmatic CTFs, "
                "using flexplugin's simulator."]

    def _citations(self) -> list[str]:
        return []  # the simulator is flexplugin's own; 3DVA/3D Flex protocols cite Punjani2021/2023

    # --------------------------- UTILS functions -----------------------------
    def _getDataDir(self, *paths: str) -> str:
        return self._getExtraPath("data", *paths)

    def _getSimulateArgs(self) -> list[str]:
        """The `flexplugin simulate` argument list built from the form."""
        return ["--out", self._getDataDir(),
                "--n", self.numberOfParticles.get(),
                "--box", self.boxSize.get(),
                "--apix", self.pixelSize.get(),
                "--snr", self.snr.get(),
                "--seed", self.seed.get(),
                "--hinge", self.hingeAmplitude.get(),
                "--twist", self.twistAmplitude.get(),
                "--stack-size", self.stackSize.get()]
