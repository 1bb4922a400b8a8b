"""3D Flex training settings: every option's one declaration and default (torch-free, so the CLI and the
Scipion protocol can read the defaults without importing torch). Names follow the CLI options; cryoSPARC's
keys are in the comments."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Every training setting; names follow the CLI options (cryoSPARC's keys in comments)."""

    k: int = 2  # flex_K
    layers: int = 6  # flex_num_layers
    hidden: int = 64  # flex_hidden_units
    epochs: int = 16  # base schedule
    extra_epochs: int = 0  # flex_extra_epochs
    batch_size: int = 64
    lr_flow_init: float = 0.005  # flex_lr_flex_init
    lr_flow_final: float = 0.0005  # flex_lr_flex_final
    lr_density: float = 0.01  # flex_lr_density_init/_final
    lr_latent: float | None = None  # None: 0.01 with initial latents (e.g. 3DVA), 0.05 from random ones
    rigidity: float = 2.0  # flex_sv_lam
    latent_noise: float = 0.15  # flex_latent_samp_std
    latent_prior: float = 20.0  # flex_latent_prior_lam
    latent_prior_pow: float = 4.0  # flex_latent_prior_pow
    density_l2: float = 1e-3
    kmax_start: float = 0.4  # fraction of training Nyquist at epoch 0
    kmax_final: float = 0.8  # fraction of training Nyquist at the end of the base schedule
    seed: int = 0
    noise_particles: int = 1000  # particles used to estimate the scale and the noise spectrum
    rigidity_cells: int = 2048  # cells drawn per step for the rigidity mean (all when the mesh has fewer)
    search_start: int = 1  # first epoch that starts with a latent search (0: before any training)
    search_every: int = 1  # epochs between latent searches (0: never during training)
    search_points: int = 0  # grid points per latent axis (K ≤ 2; K ≥ 3 draws points²); 0: 15 for K=1, 9 otherwise
    final_search: bool = True  # a finer search after the last epoch (the latents written out)
    # band of the searches during training, as a fraction of training Nyquist (capped by the epoch's k_max); the
    # final search uses the final band. A lower band makes the search cheaper (decoded box³ and slice area) at
    # some cost in latent accuracy: docs/flex_training.md has the figures. 1.0: the epoch's own band
    search_kmax: float = 1.0

    def validate(self) -> None:
        """Refuse meaningless settings before any heavy work, naming the CLI option and value (NaN/Inf too)."""
        max_k = 16  # a bound against typos such as --k 100; 2 is the usual start

        def pos(x: float) -> bool:
            return math.isfinite(x) and x > 0

        def nonneg(x: float) -> bool:
            return math.isfinite(x) and x >= 0

        lr_latent = 1.0 if self.lr_latent is None else self.lr_latent
        checks = [("--k", self.k, 1 <= self.k <= max_k, f"from 1 to {max_k} (start with 2)"),
                  ("--layers", self.layers, self.layers >= 1, ">= 1"), ("--hidden", self.hidden, self.hidden >= 1, ">= 1"),
                  ("--epochs", self.epochs, self.epochs >= 1, ">= 1"),
                  ("--extra-epochs", self.extra_epochs, self.extra_epochs >= 0, ">= 0"),
                  ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
                  ("--seed", self.seed, 0 <= self.seed < 10 ** 8, "from 0 to 99999999"),  # per-step seeds < 2**64
                  ("--lr-flow-init", self.lr_flow_init, pos(self.lr_flow_init), "a number > 0"),
                  ("--lr-flow-final", self.lr_flow_final, pos(self.lr_flow_final), "a number > 0"),
                  ("--lr-density", self.lr_density, pos(self.lr_density), "a number > 0"),
                  ("--lr-latent", lr_latent, pos(lr_latent), "a number > 0"),
                  ("--rigidity", self.rigidity, nonneg(self.rigidity), "a number >= 0"),
                  ("--latent-noise", self.latent_noise, nonneg(self.latent_noise), "a number >= 0"),
                  ("--latent-prior", self.latent_prior, nonneg(self.latent_prior), "a number >= 0"),
                  ("--latent-prior-pow", self.latent_prior_pow, nonneg(self.latent_prior_pow - 1),
                   "a number >= 1 (below 1 the prior's slope at 0 is infinite)")]
        for name, value, ok, need in checks:
            if not ok:
                raise InputError(f"{name} must be {need}; got {value}")
        for name, value in (("--search-start", self.search_start), ("--search-every", self.search_every),
                            ("--search-points", self.search_points)):
            if value < 0:
                raise InputError(f"{name} must be >= 0; got {value}")
        if self.search_points == 1 or self.search_points > 64:
            raise InputError(f"--search-points must be 0 (automatic) or from 2 to 64; got {self.search_points}")
        if not (math.isfinite(self.search_kmax) and 0 < self.search_kmax <= 1):
            raise InputError(f"--search-kmax must be a fraction of Nyquist in (0, 1]; got {self.search_kmax}")
        if self.rigidity_cells < 1:
            raise InputError(f"--rigidity-cells must be >= 1; got {self.rigidity_cells}")
        if not 0 < self.kmax_start <= self.kmax_final <= 1:
            raise InputError("need 0 < kmax-start <= kmax-final <= 1")
