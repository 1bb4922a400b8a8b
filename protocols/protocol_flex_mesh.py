"""3D Flex mesh prep: the tetrahedral mesh and per-cell rigidity weights that 3D Flex training deforms.

Mirrors cryoSPARC's "3D Flex Mesh Prep" (docs/algorithms.md §2.2) through `flexplugin flex-mesh`. Training points
at this protocol to use its mesh; the soft solvent mask the mesh covers is registered as a VolumeMask.
"""
from __future__ import annotations

import json
import os
import re
from enum import Enum

import mrcfile
import numpy as np

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import EMFile, VolumeMask

from .protocol_base import FlexPluginProtBase

__all__ = ["FlexPluginProtMeshPrep", "cropMapFile", "plainFileName", "meshEngineArgs", "MESH_FILES"]

# what `flexplugin flex-mesh` writes into its --out folder
MESH_FILES = {"mesh": "mesh.pkl", "pdb": "mesh.pdb", "mask": "mesh_mask.mrc", "slices": "mesh_slices.png",
              "info": "mesh.json"}
_FUSE_RE = re.compile(r"^\s*\d+\s*>\s*\d+\s*(,\s*\d+\s*>\s*\d+\s*)*$")
_RIGID_RE = re.compile(r"^\s*\d+\s*([,\s]\s*\d+\s*)*$")


def plainFileName(fileName: str) -> str:
    """A Scipion image file name without its format hint (':mrc', ':mrcs')."""
    base, sep, hint = fileName.rpartition(":")
    return base if sep and hint and "/" not in hint and hint.isalnum() else fileName


def cropMapFile(src: str, dst: str, box: int) -> str:
    """Write the central box³ of an MRC map to dst (same pixel size); the centre voxel N//2 stays at box//2.

    This is the centring the engine uses to crop particles and maps (`engine.fourier.crop_center`), so a mesh
    built on the cropped map lines up with the cropped training data.
    """
    with mrcfile.mmap(src, mode="r", permissive=True) as m:
        n = int(m.data.shape[-1])
        if box > n:
            raise ValueError(f"cannot crop {src} ({n} px) to {box} px")
        lo = n // 2 - box // 2
        data = np.array(m.data[lo:lo + box, lo:lo + box, lo:lo + box], dtype=np.float32)
        apix = float(m.voxel_size.x)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with mrcfile.new(dst, overwrite=True) as out:
        out.set_data(data)
        out.voxel_size = apix
    return dst


def meshEngineArgs(volume: str, outDir: str, mask: str | None = None, cells: int = 20,
                   rigidityMin: float = 0.5, stiffenLowDensity: bool = False, segmentation: str | None = None,
                   fuse: str = "", rigid: str = "", maskLowpass: float | None = None,
                   maskThreshold: float | None = None, maskDilate: float | None = None,
                   maskPad: float | None = None) -> list:
    """The `flexplugin flex-mesh` argument list (options left as None keep the engine's defaults)."""
    args = ["--volume", volume, "--out", outDir, "--cells", cells, "--rigidity-min", rigidityMin]
    if mask:
        args += ["--mask", mask]
    if stiffenLowDensity:
        args += ["--stiffen-low-density"]
    if segmentation:
        args += ["--segmentation", segmentation]
        if fuse and fuse.strip():
            args += ["--fuse", fuse.strip()]
        if rigid and rigid.strip():
            args += ["--rigid", rigid.strip()]
    if not mask:
        for option, value in (("--mask-lowpass", maskLowpass), ("--mask-threshold", maskThreshold),
                              ("--mask-dilate", maskDilate), ("--mask-pad", maskPad)):
            if value is not None:
                args += [option, value]
    return args


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
        form.addParam("numberOfCells", params.IntParam, default=20,
                      validators=[params.GE(2, "Use at least 2 cells across the box")],
                      label="Number of tetra cells across the box",
                      help="Tetra cells along each of x, y and z over the (cropped) box (cryoSPARC: "
                           "tetra_num_cells, default 20). More cells give a finer mesh that can model more local "
                           "motion but is less constrained and slower; fewer cells give smoother, more rigid "
                           "motion.")
        form.addParam("rigidityMin", params.FloatParam, default=0.5,
                      validators=[params.Positive],
                      label="Min. rigidity weight",
                      help="Rigidity weight of empty cells; cells in the densest regions get 1.0 (cryoSPARC: "
                           "rigidity_penalty_min, default 0.5). Lower values let solvent regions deform more "
                           "freely.")
        form.addParam("stiffenLowDensity", params.BooleanParam, default=False,
                      label="Stiffen low-density regions?",
                      help="Give peripheral non-empty cells a weight of 3.0 (cryoSPARC: "
                           "rigidity_penalty_stiffen_low_density, default No). Use it when weak peripheral "
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
        form.addParam("maskLowpass", params.FloatParam, default=10.0, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      label="Mask: low-pass filter (Å)",
                      help="The map is low-pass filtered to this resolution before thresholding (cryoSPARC: "
                           "mask_in_lowpass_A, default 10 Å). Raise it for noisy maps. Only used without an "
                           "input mask.")
        form.addParam("maskThreshold", params.FloatParam, default=None, allowsNull=True, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Mask: threshold (map units)",
                      help="Absolute density threshold of the low-passed map (cryoSPARC: "
                           "mask_in_threshold_level). Empty: 5 % of the low-passed map's maximum. Lower it if "
                           "parts of the particle fall outside the mask. Only used without an input mask.")
        form.addParam("maskDilate", params.FloatParam, default=2.0, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(0)],
                      label="Mask: dilation (Å)",
                      help="Dilation of the thresholded mask (cryoSPARC: mask_dilate_A, default 2 Å). Only used "
                           "without an input mask.")
        form.addParam("maskPad", params.FloatParam, default=5.0, condition=autoMask,
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.GE(0)],
                      label="Mask: soft edge (Å)",
                      help="Width of the soft edge added around the mask (cryoSPARC: mask_pad_A, default 5 Å). "
                           "Only used without an input mask.")

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.meshStep, self._getMeshArgs(), needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def meshStep(self, args: list) -> None:
        """Crop the inputs if asked, then run `flexplugin flex-mesh` (from scratch: old files are replaced)."""
        pwutils.cleanPath(self._getMeshDir())
        crop = self._getCropBox()
        if crop is not None:
            for src, dst in self._getCroppedInputs().items():
                cropMapFile(src, dst, crop)
                self.info(f"Cropped {src} to {crop} px: {dst}")
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

    def _getCroppedInputs(self) -> dict[str, str]:
        """{input file: its cropped copy} for the volume, mask and segmentation given."""
        files = {}
        for ptr, name in ((self.inputVolume, "volume"), (self.inputMask, "mask"),
                          (self.inputSegmentation, "segmentation")):
            if ptr.get() is not None:
                files[plainFileName(ptr.get().getFileName())] = self._getExtraPath("input", f"{name}_crop.mrc")
        return files

    def _meshInput(self, ptr) -> str | None:
        """The file flex-mesh reads for an input: the cropped copy when cropping, else the input itself."""
        obj = ptr.get()
        if obj is None:
            return None
        fn = plainFileName(obj.getFileName())
        return self._getCroppedInputs()[fn] if self._getCropBox() is not None else fn

    def _getMeshArgs(self) -> list:
        """The `flexplugin flex-mesh` argument list built from the form."""
        return meshEngineArgs(self._meshInput(self.inputVolume), self._getMeshDir(),
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
        """The map the mesh was built on (the cropped copy when cropping), to show with mesh.pdb."""
        return self._meshInput(self.inputVolume)

    def getMeshInfo(self) -> dict | None:
        """mesh.json (vertices, cells, box, apix, rigidity range, segments) once the mesh exists, else None."""
        path = self._getMeshDir(MESH_FILES["info"])
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    def getMeshExtent(self) -> float | None:
        """Physical width of the meshed box in Å (crop box or volume box × pixel size), known before running."""
        vol = self.inputVolume.get()
        if vol is None or not vol.getDim():
            return None
        box = self._getCropBox() or vol.getDim()[0]
        return box * vol.getSamplingRate()
