"""Scipion particle sets <-> the engine's RELION 3.1 STAR and latents files, always matched by particle id.

The STAR files carry `rlnImageId` = the Scipion object id of each particle, so results computed by the
engine come back to the right particle whatever the order of rows; latent coordinates (zFlex) travel in the
engine's latents file (`flexplugin.engine.latents`) both ways. Poses follow docs/algorithms.md §3: Scipion's
ALIGN_PROJ matrix M = [[Aᵀ, Aᵀ s], [0, 1]] with A the RELION rotation and s the origin shift in pixels
(`flexplugin.engine.geometry` holds the maths); RELION 3.1 stores shifts in Å.

This is the only module that translates between pwem objects and engine files.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import mrcfile
import numpy as np

import pyworkflow.object as pwobj
from pwem.constants import ALIGN_NONE, ALIGN_PROJ, NO_INDEX
from pwem.objects import (
    Acquisition,
    CTFModel,
    FlexInfo,
    Particle,
    ParticleFlex,
    SetOfParticles,
    SetOfParticlesFlex,
    Transform,
)

from .engine.atomic import atomic_path
from .engine.errors import DiskFullError, InputError
from .engine.latents import ID_LABEL, read_latents, write_latents

if TYPE_CHECKING:
    import pandas as pd

# pandas, engine.geometry and engine.io (torch) are imported where used: protocols import this module when
# Scipion loads the plugin, and the GUI should not pay for them

__all__ = ["writeSetOfParticles", "particlesToStarTables", "readSetOfParticles", "updateParticlesFromStar",
           "rowToParticle", "iterRowsById", "writeZFlexLatents", "readSetOfParticlesFlex", "plainFileName",
           "MRC_EXTENSIONS", "RANDOM_SUBSET_ATTR"]

MRC_EXTENSIONS = (".mrc", ".mrcs")
RANDOM_SUBSET_ATTR = "_rlnRandomSubset"  # how the relion plugin stores half-set labels on particles
DEFAULT_MAGNIFICATION = 10000.0  # RELION's convention: detector pixel (µm) = pixel size (Å) at 10,000x


def plainFileName(fileName: str) -> str:
    """A Scipion file name without its format hint (':mrcs', ':mrc', ':spi', ...), as the engine reads it."""
    base, sep, hint = fileName.rpartition(":")
    if sep and hint and "/" not in hint and hint.isalnum():
        return base
    return fileName



class _StackResolver:
    """Absolute path of an MRC stack for each Scipion stack; other formats are converted once to .mrcs."""

    def __init__(self, outputDir: str | None):
        self.outputDir = outputDir
        self._cache: dict[str, str] = {}

    def __call__(self, fileName: str, particleId: int) -> str:
        path = self._cache.get(fileName)
        if path is None:
            path = self._resolve(fileName, particleId)
            self._cache[fileName] = path
        return path

    def _resolve(self, fileName: str, particleId: int) -> str:
        src = os.path.abspath(plainFileName(fileName))
        if not os.path.exists(src):
            raise InputError(f"particle {particleId}: image stack {src} does not exist")
        if src.lower().endswith(MRC_EXTENSIONS):
            return src
        if self.outputDir is None:
            raise InputError(f"particle {particleId}: stack {src} is not MRC; give an output folder so it can "
                             "be converted to .mrcs")
        from pwem.emlib.image import ImageHandler
        os.makedirs(self.outputDir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(src))[0]
        dst = os.path.abspath(os.path.join(self.outputDir, f"{stem}.mrcs"))
        k = 1
        while dst in self._cache.values():  # two stacks with one name in different folders
            dst = os.path.abspath(os.path.join(self.outputDir, f"{stem}_{k}.mrcs"))
            k += 1
        # atomically: an interrupted or disk-full conversion leaves no half-written stack under the final name
        try:
            with atomic_path(dst, keep_suffix=True) as tmp:  # the temp name keeps .mrcs: xmipp picks the format by it
                ImageHandler().convertStack(src, str(tmp))
        except DiskFullError:
            raise
        except Exception as e:
            # xmipp reports a failed write without its errno: call it a full disk when the stack cannot fit
            if _freeBytes(self.outputDir) < _mrcStackBytes(src):
                raise DiskFullError(dst) from e
            raise
        return dst


def _freeBytes(folder: str) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62  # unknown: do not guess a full disk


def _mrcStackBytes(src: str) -> int:
    """Size of `src` converted to a float32 MRC stack (header included); 0 when unknown."""
    try:
        from pwem.emlib.image import ImageHandler
        x, y, z, n = ImageHandler().getDimensions(src)
        return 1024 + 4 * int(x) * int(y) * int(z) * int(n)
    except Exception:  # noqa: BLE001
        return 0


def _acquisitionKey(acq: Acquisition | None, fallback: Acquisition) -> tuple[float, float, float]:
    """(voltage kV, Cs mm, amplitude contrast) of a particle, from the set when the particle has none."""
    def value(getter: str) -> float | None:
        v = getattr(acq, getter)() if acq is not None else None
        return getattr(fallback, getter)() if v is None else v
    key = (value("getVoltage"), value("getSphericalAberration"), value("getAmplitudeContrast"))
    if any(v is None for v in key):
        raise InputError("particles have no acquisition (voltage, spherical aberration, amplitude contrast); "
                         "set them when importing the particles")
    return tuple(round(float(v), 6) for v in key)


def _checkParticleSet(partSet: SetOfParticles, requireAlignment: bool, requireCTF: bool) -> float:
    """Clear errors for sets the engine cannot use; returns the pixel size in Å."""
    if partSet is None:
        raise InputError("no particle set given")
    if partSet.getSize() == 0:
        raise InputError("the particle set is empty")
    if requireAlignment and not partSet.hasAlignmentProj():
        raise InputError(f"particles have alignment '{partSet.getAlignment()}', but 3D projection alignment "
                         f"({ALIGN_PROJ}) is needed: use particles from a 3D refinement")
    if requireCTF and not partSet.hasCTF():
        raise InputError("particles have no CTF: estimate the CTF of the micrographs before extracting them")
    apix = partSet.getSamplingRate()
    if not apix or apix <= 0:
        raise InputError(f"particles have no valid sampling rate ({apix})")
    return float(apix)


def _stackBox(stack: str) -> int:
    """Image width of an MRC stack, read from its header, refusing non-square images."""
    with mrcfile.open(stack, mode="r", header_only=True, permissive=True) as m:
        nx, ny = int(m.header.nx), int(m.header.ny)
    if nx != ny:
        raise InputError(f"{stack}: particles must be square, got {nx}x{ny}")
    return nx


def particlesToStarTables(partSet: SetOfParticles, outputDir: str | None = None, requireAlignment: bool = True,
                          requireCTF: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(particles, optics) RELION 3.1 tables for a particle set, one row per particle in id order."""
    apix = _checkParticleSet(partSet, requireAlignment, requireCTF)
    box = None
    withPoses = partSet.hasAlignmentProj()
    withCTF = partSet.hasCTF()
    setAcq = partSet.getAcquisition()
    resolve = _StackResolver(outputDir)
    groups: dict[tuple, int] = {}
    rows = []
    subsets: list[int | None] = []
    for p in partSet.iterItems(orderBy="id"):
        pid = int(p.getObjId())
        index, fileName = p.getLocation()
        if not fileName:
            raise InputError(f"particle {pid} has no image file")
        stack = resolve(fileName, pid)
        if box is None:
            box = _stackBox(stack)
        key = _acquisitionKey(p.getAcquisition(), setAcq)
        group = groups.setdefault(key, len(groups) + 1)
        row = {"rlnImageName": f"{index if index and index != NO_INDEX else 1:06d}@{stack}", ID_LABEL: pid,
               "rlnOpticsGroup": group}
        if withPoses:
            from .engine.geometry import relion_from_scipion_matrix
            t = p.getTransform()
            if t is None:
                raise InputError(f"particle {pid} has no 3D alignment although the set says {ALIGN_PROJ}")
            try:
                rot, tilt, psi, sx, sy = relion_from_scipion_matrix(t.getMatrix())
            except ValueError as e:
                raise InputError(f"particle {pid}: {e}") from e
            row.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi,
                       rlnOriginXAngst=sx * apix, rlnOriginYAngst=sy * apix)
        if withCTF:
            ctf = p.getCTF()
            if ctf is None or ctf.getDefocusU() is None or ctf.getDefocusV() is None:
                raise InputError(f"particle {pid} has no CTF although the set says it has one")
            row.update(rlnDefocusU=ctf.getDefocusU(), rlnDefocusV=ctf.getDefocusV(),
                       rlnDefocusAngle=ctf.getDefocusAngle() or 0.0,
                       rlnPhaseShift=ctf.getPhaseShift() if ctf.hasPhaseShift() else 0.0)
        subset = getattr(p, RANDOM_SUBSET_ATTR, None)
        subsets.append(int(subset.get()) if subset is not None and subset.get() is not None else None)
        rows.append(row)
    import pandas as pd
    particles = pd.DataFrame(rows)
    if all(s is not None for s in subsets):  # RELION needs the column complete or absent
        particles["rlnRandomSubset"] = subsets
    optics = pd.DataFrame([{
        "rlnOpticsGroup": g, "rlnOpticsGroupName": f"opticsGroup{g}", "rlnVoltage": k[0],
        "rlnSphericalAberration": k[1], "rlnAmplitudeContrast": k[2], "rlnImagePixelSize": apix,
        "rlnImageSize": box, "rlnImageDimensionality": 2,
        "rlnCtfDataArePhaseFlipped": int(bool(partSet.isPhaseFlipped())),
    } for k, g in groups.items()])
    return particles, optics


def writeSetOfParticles(partSet: SetOfParticles, starPath: str, outputDir: str | None = None,
                        requireAlignment: bool = True, requireCTF: bool = True) -> int:
    """Write a particle set as a RELION 3.1 STAR file for the engine; returns the number of particles.

    Image names are absolute `index@stack` paths; stacks that are not MRC are converted to .mrcs files in
    `outputDir`. `rlnImageId` is the particle's Scipion id. The STAR file and the converted stacks are written
    atomically (temp file + rename, `flexplugin.engine.atomic`): an interrupted or disk-full write leaves the
    previous file intact and no temp file; a full disk raises `DiskFullError` naming the file.
    """
    from .engine.io import write_particles_star
    particles, optics = particlesToStarTables(partSet, outputDir, requireAlignment, requireCTF)
    folder = os.path.dirname(os.path.abspath(starPath))
    os.makedirs(folder, exist_ok=True)
    write_particles_star(starPath, particles, optics)
    return len(particles)


def _float(row: dict, label: str, default: float = 0.0) -> float:
    v = row.get(label, default)
    return default if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def _storedPath(path: str, relativeTo: str | None) -> str:
    """`path` relative to `relativeTo` when it lies below it (Scipion projects use relative paths)."""
    if relativeTo:
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(relativeTo))
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return rel
    return path


def rowToParticle(row: dict, apix: float, withPoses: bool = True, withCTF: bool = True,
                  relativeTo: str | None = None) -> Particle:
    """A Particle (id, location, sampling, acquisition, CTF, ALIGN_PROJ transform) from one merged STAR row."""
    from .engine.io import split_image_name
    p = Particle()
    p.setObjId(int(row[ID_LABEL]))
    index, path = split_image_name(str(row["rlnImageName"]))
    p.setLocation(index, _storedPath(path, relativeTo))
    p.setSamplingRate(apix)
    p.setAcquisition(Acquisition(magnification=DEFAULT_MAGNIFICATION, voltage=_float(row, "rlnVoltage"),
                                 sphericalAberration=_float(row, "rlnSphericalAberration"),
                                 amplitudeContrast=_float(row, "rlnAmplitudeContrast")))
    if withCTF:
        ctf = CTFModel()
        ctf.setStandardDefocus(_float(row, "rlnDefocusU"), _float(row, "rlnDefocusV"),
                               _float(row, "rlnDefocusAngle"))
        ctf.setPhaseShift(_float(row, "rlnPhaseShift"))
        p.setCTF(ctf)
    if withPoses:
        p.setTransform(Transform(_poseMatrix(row, apix)))
    if "rlnRandomSubset" in row and row["rlnRandomSubset"] is not None:
        setattr(p, RANDOM_SUBSET_ATTR, pwobj.Integer(int(row["rlnRandomSubset"])))
    return p


def _poseMatrix(row: dict, apix: float) -> np.ndarray:
    from .engine.geometry import scipion_matrix_from_relion
    return scipion_matrix_from_relion(_float(row, "rlnAngleRot"), _float(row, "rlnAngleTilt"),
                                      _float(row, "rlnAnglePsi"), _float(row, "rlnOriginXAngst") / apix,
                                      _float(row, "rlnOriginYAngst") / apix)


def _starRecords(starPath: str) -> tuple[list[dict], object]:
    from .engine.io import read_particles
    ps = read_particles(starPath)
    records = ps.table.to_dict("records")
    for r in records:
        if isinstance(r.get("rlnRandomSubset"), float) and np.isnan(r["rlnRandomSubset"]):
            r["rlnRandomSubset"] = None
    return records, ps


def readSetOfParticles(starPath: str, partSet: SetOfParticles, relativeTo: str | None = None) -> int:
    """Fill an empty particle set from a STAR file: ids = `rlnImageId`; returns the number of particles.

    Stack paths are stored relative to `relativeTo` (e.g. the project folder) when they lie below it.
    """
    records, ps = _starRecords(starPath)
    first = records[0]
    partSet.setSamplingRate(ps.apix)
    partSet.setIsPhaseFlipped(ps.phase_flipped)
    partSet.setHasCTF(ps.has_ctf)
    partSet.setAlignment(ALIGN_PROJ if ps.has_poses else ALIGN_NONE)
    partSet.setAcquisition(Acquisition(magnification=DEFAULT_MAGNIFICATION, voltage=_float(first, "rlnVoltage"),
                                       sphericalAberration=_float(first, "rlnSphericalAberration"),
                                       amplitudeContrast=_float(first, "rlnAmplitudeContrast")))
    for row in records:
        partSet.append(rowToParticle(row, ps.apix, ps.has_poses, ps.has_ctf, relativeTo))
    return len(records)


def iterRowsById(partSet: SetOfParticles, rowsById: dict[int, dict],
                 skipMissing: bool = False) -> Iterator[tuple[Particle, dict]]:
    """(particle, row) pairs for each particle of the set in id order, matched by id, never by order.

    A particle without a row is an error unless `skipMissing`; rows left over are an error too.
    """
    used = 0
    for p in partSet.iterItems(orderBy="id"):
        row = rowsById.get(int(p.getObjId()))
        if row is None:
            if skipMissing:
                continue
            raise InputError(f"particle {p.getObjId()} is missing from the engine's results")
        used += 1
        yield p, row
    if used != len(rowsById):
        raise InputError(f"{len(rowsById) - used} result rows have ids that are not in the particle set")


def updateParticlesFromStar(inputSet: SetOfParticles, starPath: str, outputSet: SetOfParticles,
                            updatePoses: bool = True, updateCTF: bool = False, skipMissing: bool = False) -> int:
    """Copy `inputSet` into `outputSet`, taking poses (and optionally CTF) from the STAR row with the same id.

    Returns the number of particles written.
    """
    records, ps = _starRecords(starPath)
    if updatePoses:
        ps.require(poses=True, ctf=False)
    if updateCTF:
        ps.require(poses=False, ctf=True)
    rowsById = {int(r[ID_LABEL]): r for r in records}
    apix = inputSet.getSamplingRate()
    if abs(ps.apix - apix) > 1e-4 * apix:
        raise InputError(f"{starPath} has pixel size {ps.apix} Å but the particles have {apix} Å")
    outputSet.copyInfo(inputSet)
    if updatePoses:
        outputSet.setAlignmentProj()
    if updateCTF:
        outputSet.setHasCTF(True)
    n = 0
    for p, row in iterRowsById(inputSet, rowsById, skipMissing):
        q = p.clone()
        if updatePoses:
            q.setTransform(Transform(_poseMatrix(row, apix)))
        if updateCTF:
            ctf = q.getCTF() or CTFModel()
            ctf.setStandardDefocus(_float(row, "rlnDefocusU"), _float(row, "rlnDefocusV"),
                                   _float(row, "rlnDefocusAngle"))
            ctf.setPhaseShift(_float(row, "rlnPhaseShift"))
            q.setCTF(ctf)
        outputSet.append(q)
        n += 1
    return n


def writeZFlexLatents(partSet: SetOfParticlesFlex, path: str) -> tuple[int, int]:
    """Write the set's zFlex coordinates as the engine's latents file (by particle id), e.g. to seed flex-train;
    returns (particles, coordinates per particle). Particles with differing numbers of coordinates: InputError."""
    ids, rows, width = [], [], None
    for particle in partSet.iterItems(orderBy="id"):
        z = particle.getZFlex()
        if width is None:
            width = len(z)
        if len(z) != width or width == 0:
            raise InputError(f"particle {particle.getObjId()} has {len(z)} latent coordinates, the first has "
                             f"{width}: all particles need the same number")
        ids.append(int(particle.getObjId()))
        rows.append([float(v) for v in z])
    if not ids:
        raise InputError("the particle set is empty: no latent coordinates to write")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_latents(path, ids, np.asarray(rows, dtype=np.float64))
    return len(ids), int(width)


def readSetOfParticlesFlex(inputSet: SetOfParticles, latentsPath: str, outputSet: SetOfParticlesFlex, progName: str,
                           flexInfo: FlexInfo | None = None, extraAttrs: dict[str, str] | None = None,
                           skipMissing: bool = False) -> tuple[int, int]:
    """Fill `outputSet` with the particles of `inputSet` that have a row in the engine's latents file, each with
    its coordinates as zFlex, matched by particle id; returns (particles written, particles without a row).

    `flexInfo` becomes the set's FlexInfo (set after the input's info is copied: a SetOfParticlesFlex input
    would otherwise pass on its own). `extraAttrs` maps other columns of the file to Float attributes of each
    particle (3DVA's scale). A particle without a row is an error unless `skipMissing`; a row whose id is not in
    `inputSet` always is."""
    lat = read_latents(latentsPath)
    rowOf = lat.by_id()
    extras = {attr: lat.extra[col] for col, attr in (extraAttrs or {}).items()}
    outputSet.copyInfo(inputSet)  # sampling, alignment, acquisition, phase flip: not the CTF flag
    outputSet.setHasCTF(inputSet.hasCTF())
    if flexInfo is not None:
        outputSet.setFlexInfo(flexInfo)
    written = missing = 0
    for particle in inputSet.iterItems(orderBy="id"):
        row = rowOf.get(int(particle.getObjId()))
        if row is None:
            if not skipMissing:
                raise InputError(f"particle {particle.getObjId()} has no coordinates in {latentsPath}")
            missing += 1
            continue
        item = ParticleFlex(progName=progName)
        item.copyInfo(particle)
        item.setObjId(particle.getObjId())
        item.setFlexInfo(FlexInfo(progName))
        item.setZFlex([float(v) for v in lat.z[row]])
        item.setZRed([])
        for attr, values in extras.items():
            setattr(item, attr, pwobj.Float(float(values[row])))
        outputSet.append(item)
        written += 1
    if written != len(rowOf):
        raise InputError(f"{latentsPath}: {len(rowOf) - written} rows have particle ids that are not in the input "
                         "particles")
    return written, missing
