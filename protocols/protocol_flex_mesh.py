"""3D Flex mesh prep: the tetrahedral mesh and per-cell rigidity weights that 3D Flex training deforms.

Mirrors cryoSPARC's "3D Flex Mesh Prep" (docs/algorithms.md §2.2) through `flexplugin flex-mesh`. Training points
at this protocol to use its mesh; the soft solvent mask the mesh covers is registered as a VolumeMask.
"""
from __future__ import annotations

import re
from enum import Enum

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import EMFile, VolumeMask

from flexplugin.convert import plainFileName
from flexplugin.engine.flex.mesh_config import MeshConfig

from .constants import MESH_CROPPED_MAP, MESH_FILES
from .protocol_base import FlexPluginProtBase, meshEngineArgs, readJsonFile

__all__ = ["FlexPluginProtMeshPrep"]

_FUSE_RE = re.compile(r"^\s*\d+\s*>\s*\d+\s*(,\s*\d+\s*>\s*\d+\s*)*$")
_RIGID_RE = re.compile(r"^\s*\d+\s*([,\s]\s*\d+\s*)*$")
M = MeshConfig()  # the defaults, declared once in the engine's settings


class outputs(Enum):
    outputMask = VolumeMask
    outputMesh = EMFile


class FlexPluginProtMeshPrep(FlexPluginProtBase):
    """Builds the tetrahedral mesh of 3D Flex: a regular grid of tetrahedra over the solvent mask of the
    consensus map, with a rigidity weight per cell (1 in dense regions, lower in empty ones). Optionally one
    sub-mesh per segment of a segmentation, fused along a tree, with some segments made rigid. Point
    "3D flex training" at this run to train with this mesh."""

    _label = "3D flex mesh prep"
    _possibleOutputs = outputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form: params.Form) -> None:
        form.addSection(label="Input")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Consensus volume",
                      help="The consensus map of the particles that will be trained (same box and pixel size as "
                           "the particles). The mesh covers its solvent mask.")
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      label="Solvent mask (optional)",
                      help="A mask around the particle (values in [0, 1], same box and pixel size as the volume). "
                           "Leave empty to make one from the map (see the mask parameters). Exclude micelles or "
                           "disordered regions you do not want to move.")
        form.addParam("cropBox", params.IntParam, default=None, allowsNull=True,
                      label="Crop box size (pix)",
                      help="Leave empty to keep the full box. The mesh must span the same region as the training "
                           "data: if 3D flex training crops the particles (its 'Crop box size'), give the same "
                           "crop box here; the map (and mask, segmentation) are cropped about their centre before "
                           "meshing. Even number of pixels, at least 16.")

        form.addSection(label="Mesh")
        form.addParam("numberOfCells", params.IntParam, default=M.cells,
                      validators=[params.GE(2, "Use at least 2 cells across the box")],
                      label="Number of tetra cells across the box",
                      help="Tetra cells along each of x, y and z over the (cropped) box (cryoSPARC: "
                           "tetra_num_cells). More cells give a finer mesh that can model more local "
                           "motion but is less constrained and slower; fewer cells give smoother, more rigid "
                           "motion.")
        form.addParam("rigidityMin", params.FloatParam, default=M.rigidity_min,
                      validators=[params.Positive],
                      label="Min. rigidity weight",
                      help="Rigidity weight of empty cells; cells in the densest regions get 1.0 (cryoSPARC: "
                           "rigidity_penalty_min). Lower values let solvent regions deform more "
                           "freely.")
        form.addParam("stiffenLowDensity", params.BooleanParam, default=M.stiffen_low_density,
                      label="Stiffen low-density regions?",
                      help="Give peripheral non-empty cells a weight of 3.0 (cryoSPARC: "
                           "rigidity_penalty_stiffen_low_density). Use it when weak peripheral "
                           "density 'flies' around; it tends to over-smooth motion at domain boundaries.")
        group = form.addGroup("Segmentation (optional)")
        group.addParam("inputSegmentation", params.PointerParam, pointerClass="Volume", allowsNull=True,
                       label="Segmentation map",
                       help="A map of integer segment labels (0 = no segment) with the volume's box: one sub-mesh "
                            "is built per segment (cryoSPARC: tetra_segments_path), so segments can slide past "
                            "each other. Leave empty for a single mesh.")
        group.addParam("fuseList", params.StringParam, default="",
                       condition="inputSegmentation is not None",
                       label="Segments to fuse",
                       help="Pairs parent>child of segments whose meshes are joined, forming a tree listed "
                            "breadth-first from the root, e.g. '1>3, 1>4, 3>2' (cryoSPARC: "
                            "tetra_segments_fuse_list). Empty: segments stay separate.")
        group.addParam("rigidList", params.StringParam, default="",
                       condition="inputSegmentation is not None",
                       label="Rigid segments",
                       help="Segments that move as rigid bodies (their cells get rigidity weight 20), e.g. '2,4' "
                            "(cryoSPARC: tetra_rigid_list). Empty: none.")

        form.addSection(label="Solvent mask")
        autoMask = "inputMask is None"
        form.addParam("maskLowpass", params.FloatParam, default=M.mask_lowpass, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Mask: low-pass filter (Å)",
                      help="The map is low-pass filtered to this resolution before thresholding (cryoSPARC: "
                           "mask_in_lowpass_A). Raise it for noisy maps. Only used without an "
                           "input mask.")
        form.addParam("maskThreshold", params.FloatParam, default=M.mask_threshold, allowsNull=True, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Mask: threshold (map units)",
                      help="Absolute density threshold of the low-passed map (cryoSPARC: "
                           "mask_in_threshold_level). Empty: 5 % of the low-passed map's maximum. Lower it if "
                           "parts of the particle fall outside the mask. Only used without an input mask.")
        form.addParam("maskDilate", params.FloatParam, default=M.mask_dilate, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(0)],
                      label="Mask: dilation (Å)",
                      help="Dilation of the thresholded mask (cryoSPARC: mask_dilate_A). Only used "
                           "without an input mask.")
        form.addParam("maskPad", params.FloatParam, default=M.mask_pad, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(0)],
                      label="Mask: soft edge (Å)",
                      help="Width of the soft edge added around the mask (cryoSPARC: mask_pad_A). "
                           "Only used without an input mask.")

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.meshStep, self._getMeshArgs(), needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def meshStep(self, args: list) -> None:
        """Run `flexplugin flex-mesh` (it crops the inputs when asked), from scratch: old files are replaced."""
        pwutils.cleanPath(self._getMeshDir())
        self.runEngine("flex-mesh", args)

    def createOutputStep(self) -> None:
        """Register the soft mask the mesh covers (VolumeMask) and the mesh file (EMFile)."""
        vol = self.inputVolume.get()
        mask = VolumeMask()
        mask.setFileName(self._getMeshDir(MESH_FILES["mask"]))
        mask.setSamplingRate(vol.getSamplingRate())
        mesh = EMFile(filename=self.getMeshFile())
        self._defineOutputs(**{outputs.outputMask.name: mask, outputs.outputMesh.name: mesh})
        self._defineSourceRelation(self.inputVolume, mask)
        self._defineSourceRelation(self.inputVolume, mesh)

    # --------------------------- INFO functions ------------------------------
    def _validate(self) -> list[str]:
        errors = []
        vol = self.inputVolume.get()
        if vol is None:
            return errors  # reported by the form check
        dim = vol.getDim()
        if dim is None:
            return [f"Cannot read the volume file {vol.getFileName()}."]
        box, apix = dim[0], vol.getSamplingRate()
        if len(set(dim)) != 1:
            errors.append(f"The volume must be cubic, it is {dim[0]}x{dim[1]}x{dim[2]}.")
        for ptr, name in ((self.inputMask, "mask"), (self.inputSegmentation, "segmentation")):
            obj = ptr.get()
            if obj is None:
                continue
            odim = obj.getDim()
            if odim is None:
                errors.append(f"Cannot read the {name} file {obj.getFileName()}.")
            elif tuple(odim) != tuple(dim):
                errors.append(f"The {name} is {odim[0]}x{odim[1]}x{odim[2]} but the volume is "
                              f"{dim[0]}x{dim[1]}x{dim[2]}: they must have the same box.")
            oapix = obj.getSamplingRate()
            if name == "mask" and apix and oapix and abs(oapix - apix) > 1e-3 * apix:
                errors.append(f"The mask has pixel size {oapix:.4f} Å but the volume has {apix:.4f} Å.")
        crop = self._getCropBox()
        if crop is not None and (crop > box or crop < 16 or crop % 2):
            errors.append(f"The crop box must be even, at least 16 and at most the volume box ({box} px); "
                          f"got {crop}.")
        if self.inputSegmentation.get() is None:
            if (self.fuseList.get() or "").strip() or (self.rigidList.get() or "").strip():
                errors.append("Segments to fuse and rigid segments need a segmentation map.")
        else:
            fuse, rigid = (self.fuseList.get() or "").strip(), (self.rigidList.get() or "").strip()
            if fuse and not _FUSE_RE.match(fuse):
                errors.append(f"Segments to fuse must look like '1>3, 1>4, 3>2', got '{fuse}'.")
            if rigid and not _RIGID_RE.match(rigid):
                errors.append(f"Rigid segments must be a list of segment labels like '2,4', got '{rigid}'.")
        return errors

    def _summary(self) -> list[str]:
        info = self.getMeshInfo()
        if info is None or not self.hasAttribute(outputs.outputMesh.name):
            return ["Output not ready yet."]
        lines = [f"Mesh: {info['vertices']} vertices, {info['cells']} tetrahedra ({info['cells_across']} cells "
                 f"across a {info['box']} px box at {info['apix']:.3f} Å/px).",
                 f"Rigidity weights {info['rigidity_min']:.2f}–{info['rigidity_max']:.2f}."]
        segments = [s for s in info.get("segments", []) if s]
        if segments:
            lines.append(f"Segments: {', '.join(str(s) for s in segments)}.")
        return lines

    def _methods(self) -> list[str]:
        info = self.getMeshInfo()
        if info is None:
            return []
        return [f"A tetrahedral mesh of {info['cells']} cells and {info['vertices']} vertices "
                f"({self.numberOfCells.get()} cells across the box, minimum rigidity weight "
                f"{self.rigidityMin.get():g}) was built over the solvent mask of the consensus map for 3D Flex "
                "[Punjani2023] with flexplugin."]

    def _citations(self) -> list[str]:
        return ["Punjani2023"]

    # --------------------------- UTILS functions -----------------------------
    def _getMeshDir(self, *paths: str) -> str:
        return self._getExtraPath("mesh", *paths)

    def _getCropBox(self) -> int | None:
        crop = self.cropBox.get()
        vol = self.inputVolume.get()
        if crop is None or crop <= 0 or (vol is not None and vol.getDim() and crop == vol.getDim()[0]):
            return None
        return crop

    def _meshInput(self, ptr) -> str | None:
        """The file flex-mesh reads for an input (it crops it itself when cropping)."""
        obj = ptr.get()
        return plainFileName(obj.getFileName()) if obj is not None else None

    def _getMeshArgs(self) -> list:
        """The `flexplugin flex-mesh` argument list built from the form."""
        return meshEngineArgs(self._meshInput(self.inputVolume), self._getMeshDir(), crop=self._getCropBox(),
                              mask=self._meshInput(self.inputMask), cells=self.numberOfCells.get(),
                              rigidityMin=self.rigidityMin.get(), stiffenLowDensity=self.stiffenLowDensity.get(),
                              segmentation=self._meshInput(self.inputSegmentation), fuse=self.fuseList.get() or "",
                              rigid=self.rigidList.get() or "", maskLowpass=self.maskLowpass.get(),
                              maskThreshold=self.maskThreshold.get(), maskDilate=self.maskDilate.get(),
                              maskPad=self.maskPad.get())

    def getMeshFile(self) -> str:
        """The mesh (mesh.pkl, cryoSPARC's pickle layout) that 3D flex training reads."""
        return self._getMeshDir(MESH_FILES["mesh"])

    def getMeshFiles(self) -> dict[str, str]:
        """Paths of everything flex-mesh wrote: mesh, pdb, mask, slices, info."""
        return {k: self._getMeshDir(v) for k, v in MESH_FILES.items()}

    def getMeshMapFile(self) -> str | None:
        """The map the mesh was built on (flex-mesh's cropped copy when cropping), to show with mesh.pdb."""
        if self._getCropBox() is not None:
            return self._getMeshDir(MESH_CROPPED_MAP)
        return self._meshInput(self.inputVolume)

    def getMeshInfo(self) -> dict | None:
        """mesh.json (vertices, cells, box, apix, rigidity range, segments) once the mesh exists, else None."""
        return readJsonFile(self._getMeshDir(MESH_FILES["info"]))

    def getMeshExtent(self) -> float | None:
        """Physical width of the meshed box in Å (crop box or volume box × pixel size), known before running."""
        vol = self.inputVolume.get()
        if vol is None or not vol.getDim():
            return None
        box = self._getCropBox() or vol.getDim()[0]
        return box * vol.getSamplingRate()
