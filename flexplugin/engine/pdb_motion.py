"""Benchmark data from real protein structures and their continuous motions.

The built-in simulator images a synthetic three-domain object; the 3D Flex training must also be checked on
data it was not tuned on. This module turns real PDB structures into motion models the simulator can image
(`simulate.simulate_dataset(..., motion=...)`), so the images stay analytic Gaussian-atom projections + CTF +
white noise at a given SNR, exactly as for the built-in object:

- `two_state`: two experimental conformations with the same atoms (e.g. adenylate kinase closed and open),
  superposed on a rigid core (Kabsch) and linearly interpolated, t = -1 → first, t = +1 → second;
- `normal_mode`: one structure moved along one elastic-network (ANM) normal mode, every atom with its
  residue's Cα vector, t = ±1 at a given largest displacement.

ANM is written here in numpy (a Hessian of Cα springs and `numpy.linalg.eigh`) rather than taken from ProDy:
ProDy 2.6.1 ships only a 35 MB sdist that needs a C build in every CI run, and ANM is a few lines.

The structures are never vendored: `BENCHMARKS` names files inside the published mdanalysistests 2.11.0
sdist (fetched by scripts/test_setup.sh into the test cache), and `make_benchmark` writes a whole data set.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .simulate import SimConfig, simulate_dataset

__all__ = [
    "ADK_CORE",
    "BENCHMARKS",
    "BenchmarkSpec",
    "LinearMotion",
    "Structure",
    "anm_hessian",
    "anm_modes",
    "build_motion",
    "kabsch",
    "make_benchmark",
    "normal_mode",
    "read_pdb",
    "two_state",
]

ResidueRanges = Sequence[tuple[int, int]]  # inclusive residue-number ranges, any chain

ADK_CORE: tuple[tuple[int, int], ...] = ((1, 29), (60, 121), (160, 214))  # AdK CORE; NMP 30-59, LID 122-159


@dataclass
class Structure:
    """Protein heavy atoms of one model: coordinates (n, 3) Å and per-atom labels."""

    coords: np.ndarray
    element: np.ndarray
    atom_name: np.ndarray
    res_seq: np.ndarray
    chain: np.ndarray
    res_name: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)

    def residue_mask(self, ranges: ResidueRanges) -> np.ndarray:
        """Boolean (n,): atoms whose residue number lies in one of the inclusive ranges."""
        sel = np.zeros(len(self), dtype=bool)
        for lo, hi in ranges:
            sel |= (self.res_seq >= lo) & (self.res_seq <= hi)
        return sel

    def ca_mask(self) -> np.ndarray:
        """Boolean (n,): the Cα atoms."""
        return self.atom_name == "CA"

    def keys(self) -> list[tuple[str, int, str]]:
        """(chain, residue number, atom name) per atom: how two conformations are matched."""
        return list(zip(self.chain.tolist(), self.res_seq.tolist(), self.atom_name.tolist(), strict=True))

    def take(self, idx: np.ndarray) -> Structure:
        """The sub-structure of the atoms at `idx` (indices or a boolean mask), coordinates copied."""
        return Structure(self.coords[idx].copy(), self.element[idx], self.atom_name[idx], self.res_seq[idx],
                         self.chain[idx], self.res_name[idx])


def _element(line: str, name: str) -> str:
    """Element from columns 77-78, else from the atom name (CHARMM files leave 77-78 empty)."""
    el = line[76:78].strip().upper() if len(line) >= 78 else ""
    return el or name.lstrip("0123456789")[:1].upper()


def _modified_residues(lines: list[str]) -> set[tuple[str, str, str]]:
    """(residue name, chain, residue number) of the MODRES records: modified residues of the protein chain."""
    return {(ln[12:15].strip(), ln[16].strip(), ln[18:22].strip()) for ln in lines if ln.startswith("MODRES")}


def _atom_row(line: str, path: Path) -> tuple[float, float, float, str, str, int, str, str]:
    """x, y, z, element, atom name, residue number, chain, residue name of one ATOM/HETATM record."""
    name = line[12:16].strip()
    try:
        x, y, z = float(line[30:38]), float(line[38:46]), float(line[46:54])
        res_seq = int(line[22:26])
    except ValueError as e:
        raise InputError(f"{path}: malformed atom record {line.rstrip()!r}") from e
    return x, y, z, _element(line, name), name, res_seq, line[21].strip(), line[17:20].strip()


def read_pdb(path: str | os.PathLike) -> Structure:
    """Protein heavy atoms of a PDB file: ATOM records of the first MODEL, altloc ' ' or 'A', no hydrogens.

    HETATM records are dropped (ligands, waters, ions) except a modified residue of the chain named by a
    MODRES record (1HVR's S-hydroxycysteine 67), so the chain keeps no hole where it is."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"PDB file not found: {p}")
    with open(p, errors="replace") as fh:
        lines = fh.read().splitlines()
    modres = _modified_residues(lines)
    rows: list[tuple[float, float, float, str, str, int, str, str]] = []
    for line in lines:
        rec = line[:6]
        if rec.startswith("ENDMDL"):
            break
        polymer = rec == "ATOM  " or (rec == "HETATM" and
                                      (line[17:20].strip(), line[21].strip(), line[22:26].strip()) in modres)
        if polymer and len(line) >= 54 and line[16] in " A":
            row = _atom_row(line, p)
            if row[3] not in ("H", "D"):
                rows.append(row)
    if not rows:
        raise InputError(f"{p} has no protein heavy atoms (ATOM records); is it a PDB file?")
    cols = list(zip(*rows, strict=True))
    return Structure(np.array(cols[:3], dtype=np.float64).T, np.array(cols[3]), np.array(cols[4]),
                     np.array(cols[5], dtype=int), np.array(cols[6]), np.array(cols[7]))


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation s minimising |mobile @ R.T + s - target| (least-squares superposition)."""
    cm, ct = mobile.mean(0), target.mean(0)
    u, _, vt = np.linalg.svd((mobile - cm).T @ (target - ct))
    d = np.sign(np.linalg.det(u @ vt))
    R = (u @ np.diag([1.0, 1.0, d]) @ vt).T
    return R, ct - cm @ R.T


def anm_hessian(ca: np.ndarray, cutoff: float = 15.0) -> np.ndarray:
    """ANM Hessian (3n, 3n): unit springs between Cα closer than `cutoff` Å (Atilgan et al. 2001)."""
    n = len(ca)
    d = ca[None, :, :] - ca[:, None, :]  # (n, n, 3)
    r2 = (d ** 2).sum(-1)
    contact = (r2 < cutoff ** 2) & ~np.eye(n, dtype=bool)
    blocks = -np.where(contact[..., None, None], d[..., :, None] * d[..., None, :]
                       / np.where(contact, r2, 1.0)[..., None, None], 0.0)  # (n, n, 3, 3)
    idx = np.arange(n)
    blocks[idx, idx] = -blocks.sum(1)
    return blocks.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n)


def anm_modes(ca: np.ndarray, cutoff: float = 15.0, n_modes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The lowest non-trivial ANM modes of Cα (n, 3): eigenvalues (n_modes,), unit modes (n_modes, n, 3).

    The six zero modes (rigid translations and rotations) are skipped; each mode's sign is fixed so that its
    largest component is positive, which makes data sets reproducible across LAPACK builds."""
    ca = np.asarray(ca, dtype=np.float64)
    n = len(ca)
    if n < 3 or not 1 <= n_modes <= 3 * n - 6:
        raise InputError(f"ANM needs >= 3 Cα atoms and 1 <= n_modes <= {max(0, 3 * n - 6)}; got {n} and {n_modes}")
    vals, vecs = np.linalg.eigh(anm_hessian(ca, cutoff))
    if vals[6] < 1e-6 * vals[-1]:
        raise InputError(f"the elastic network at a {cutoff} Å cutoff falls apart into pieces (more than 6 zero "
                         "modes); raise the cutoff")
    vals, vecs = vals[6:6 + n_modes], vecs[:, 6:6 + n_modes].T.copy()
    big = np.abs(vecs).argmax(1)
    vecs *= np.sign(vecs[np.arange(n_modes), big])[:, None]
    return vals, vecs.reshape(n_modes, n, 3)


@dataclass
class LinearMotion:
    """Atoms moving on straight lines from `start` (t = -1) to `end` (t = +1), Å, origin at the box centre.

    Same interface as `simulate.FlexibleObject`, so `simulate_dataset` images it directly."""

    start: np.ndarray
    end: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return len(self.start)

    def atoms(self, t: np.ndarray) -> np.ndarray:
        """Atom positions (B, n_atoms, 3) Å for t (B,); exactly `start` at t = -1 and `end` at t = +1."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))[:, None, None]
        return (1 - t) / 2 * self.start + (1 + t) / 2 * self.end

    def max_displacement(self) -> float:
        """Largest atom displacement (Å) between t = -1 and t = +1."""
        return float(np.linalg.norm(self.end - self.start, axis=1).max())

    def max_radius(self) -> float:
        """Largest distance (Å) of any atom from the box centre over the motion (both ends suffice: lines)."""
        return float(max(np.linalg.norm(self.start, axis=1).max(), np.linalg.norm(self.end, axis=1).max()))


def _matched(a: Structure, b: Structure) -> tuple[Structure, Structure]:
    """a and b restricted to their common atoms (by chain, residue number, atom name), in a's order."""
    ka, kb = a.keys(), b.keys()
    if ka == kb:
        return a, b
    where = {k: i for i, k in enumerate(kb)}
    ia = [i for i, k in enumerate(ka) if k in where]
    if len(ia) < 0.5 * max(len(a), len(b)):
        raise InputError(f"the two conformations share only {len(ia)} of {len(a)}/{len(b)} atoms")
    return a.take(np.array(ia)), b.take(np.array([where[ka[i]] for i in ia]))


def two_state(a: Structure, b: Structure, fit_on: ResidueRanges) -> LinearMotion:
    """Interpolation a (t = -1) → b (t = +1): b superposed on a over `fit_on`, centred on the mean's centroid."""
    a, b = _matched(a, b)
    sel = a.residue_mask(fit_on)
    if sel.sum() < 3:
        raise InputError(f"the fit selection {list(fit_on)} holds {int(sel.sum())} atoms; need at least 3")
    R, s = kabsch(b.coords[sel], a.coords[sel])
    bf = b.coords @ R.T + s
    centre = ((a.coords + bf) / 2).mean(0)
    fit_rmsd = float(np.sqrt(((bf[sel] - a.coords[sel]) ** 2).sum(1).mean()))
    return LinearMotion(a.coords - centre, bf - centre,
                        {"kind": "two_state", "fit_on": [list(r) for r in fit_on], "fit_rmsd_A": fit_rmsd})


def normal_mode(s: Structure, mode: int, amplitude_A: float, cutoff: float = 15.0) -> LinearMotion:
    """s moved along ANM mode `mode` (0 = lowest non-trivial) of its Cα; largest move at t = ±1 is amplitude_A."""
    ca = s.ca_mask()
    ca_keys = list(zip(s.chain[ca].tolist(), s.res_seq[ca].tolist(), strict=True))
    if len(set(ca_keys)) != len(ca_keys):
        raise InputError("two Cα atoms share a chain and residue number; cannot assign residues to modes")
    vals, modes = anm_modes(s.coords[ca], cutoff, mode + 1)
    row = {k: i for i, k in enumerate(ca_keys)}
    res_keys = list(zip(s.chain.tolist(), s.res_seq.tolist(), strict=True))
    keep = np.array([k in row for k in res_keys])  # atoms of residues without a Cα cannot follow a mode
    s = s.take(keep)
    v = modes[mode][[row[k] for k, kept in zip(res_keys, keep, strict=True) if kept]]
    v = v * (amplitude_A / np.linalg.norm(v, axis=1).max())
    x0 = s.coords - s.coords.mean(0)
    return LinearMotion(x0 - v, x0 + v, {"kind": "normal_mode", "mode": mode, "eigenvalue": float(vals[mode]),
                                         "amplitude_A": amplitude_A, "cutoff_A": cutoff})


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark data set: source files (inside the unpacked sdist), motion constructor and its parameters."""

    description: str
    files: tuple[str, ...]
    motion: str  # "two_state" or "normal_mode"
    params: dict[str, Any]
    sdist: str = "mdanalysistests-2.11.0"


_DATA = "MDAnalysisTests/data/"
# hivpr-mode, measured on 1HVR's Cα (ANM, 15 Å cutoff, 8 Å): the three lowest modes each counter-rotate the two
# monomers, by ±18° about the dimer's C2 axis (mode 0), ±13° about the line joining the monomers' centroids
# (mode 1) and ±12° about the axis normal to both, opening the flap tips from 4.2 to 7.4 Å (mode 2). Mode 0 is
# antisymmetric: the dimer's C2 turns its t = +1 state into its t = -1 state (Cα RMSD 0.33 Å), so the sign of t
# would live only in the poses. Mode 1 is C2-symmetric (t and -t are different shapes) and the lowest such: used.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "adk-closure": BenchmarkSpec(
        "E. coli adenylate kinase closed (1AKE, t = -1) to open (4AKE, t = +1), superposed on the CORE (residues "
        "1-29, 60-121, 160-214): the LID (122-159) and NMP (30-59) domains hinge open, the LID by up to 24 Å",
        (_DATA + "adk_closed.pdb", _DATA + "adk_open.pdb"), "two_state", {"fit_on": ADK_CORE}),
    "hivpr-mode": BenchmarkSpec(
        "HIV-1 protease dimer (1HVR, inhibitor dropped) along ANM mode 1 at 8 Å: the monomers counter-rotate "
        "±13° about the line joining their centres (B turns 27° relative to A from t = 0 to ±1), C2-symmetric",
        (_DATA + "1hvr.pdb",), "normal_mode", {"mode": 1, "amplitude_A": 8.0}),
}


def build_motion(spec: BenchmarkSpec, sdist_dir: str | os.PathLike) -> LinearMotion:
    """The motion model of a benchmark from its files in the unpacked sdist folder."""
    structures = [read_pdb(Path(sdist_dir) / f) for f in spec.files]
    if spec.motion == "two_state":
        return two_state(structures[0], structures[1], **spec.params)
    if spec.motion == "normal_mode":
        return normal_mode(structures[0], **spec.params)
    raise InputError(f"unknown motion constructor {spec.motion!r}")


def make_benchmark(name: str, sdist_dir: str | os.PathLike, out: str | os.PathLike, n: int = 2000, box: int = 64,
                   apix: float = 1.5, snr: float = 0.1, seed: int = 0, progress: Callable[[str], None] = print,
                   **sim: Any) -> dict:
    """Write benchmark `name` (a key of BENCHMARKS) to `out` with the simulator; returns simulation.json's dict.

    `sim` passes further SimConfig fields (atom_sigma_A, defocus range, n_states, stack_size …)."""
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    cfg = SimConfig(n=n, box=box, apix=apix, snr=snr, seed=seed, hinge_deg=0.0, twist_deg=0.0, **sim)
    motion = build_motion(spec, sdist_dir)
    room = 0.5 * box * apix - 3 * cfg.atom_sigma_A - cfg.max_shift_px * apix * np.sqrt(2)
    if motion.max_radius() > room:
        raise InputError(f"{name} reaches {motion.max_radius():.1f} Å from the centre but a {box}-px box at "
                         f"{apix} Å/px holds {room:.1f} Å (with the atoms' width and shifts); use a larger box or apix")
    dataset = {"name": name, "description": spec.description, "sdist": spec.sdist, "files": list(spec.files),
               "max_displacement_A": motion.max_displacement(), "max_radius_A": motion.max_radius(),
               **motion.info}
    progress(f"benchmark {name}: {motion.n_atoms} atoms, largest displacement {motion.max_displacement():.1f} Å")
    return simulate_dataset(cfg, out, progress, motion=motion, dataset=dataset)
