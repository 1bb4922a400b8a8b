"""3D Flex training settings: every option's one declaration, default and help text (torch-free, so the CLI and
the Scipion protocol can read them without importing torch). Names follow the CLI options (engine/options.py);
each field's metadata holds the key of the cryoSPARC parameter it mirrors."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from ..options import setting

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Every training setting, declared once: default, help text and cryoSPARC key (engine/options.py); the CLI
    options and the protocol's defaults are made from these fields."""

    k: int = setting(2, "latent dimensions, 1 to 16; start with 2", "flex_K")
    layers: int = setting(6, "flow generator hidden layers", "flex_num_layers")
    hidden: int = setting(64, "hidden units per layer", "flex_hidden_units")
    epochs: int = setting(16, "base schedule epochs: the learning rate is annealed and the band raised over them")
    extra_epochs: int = setting(0, "epochs after the schedule, at its final learning rate and band",
                                "flex_extra_epochs")
    batch_size: int = setting(64, "particles per step")
    lr_flow_init: float = setting(0.005, "flow generator learning rate at the start", "flex_lr_flex_init")
    lr_flow_final: float = setting(0.0005, "flow generator learning rate at the end", "flex_lr_flex_final")
    lr_density: float = setting(0.01, "canonical map learning rate", "flex_lr_density_init/_final")
    lr_latent: float | None = setting(
        None, "latent step size (per-particle Adam); default 0.01 when --init-latents seeds them (keeps a good "
              "seed), 0.05 from random latents (needed to find the motion)")
    rigidity: float = setting(2.0, "rigidity prior λ on the volume-weighted mean of the cells' deviation from "
                                   "rigidity, so independent of the mesh size", "flex_sv_lam")
    latent_noise: float = setting(0.15, "noise injection std, latent units", "flex_latent_samp_std")
    latent_prior: float = setting(20.0, "latent centring strength: raise if many latents hit ±1.5",
                                  "flex_latent_prior_lam")
    latent_prior_pow: float = setting(4.0, "latent centring power p (strength × |z|^p)", "flex_latent_prior_pow")
    density_l2: float = setting(1e-3, "L2 penalty on the canonical map", cli=False)
    kmax_start: float = setting(0.4, "band at epoch 0, fraction of training Nyquist", cli=False)
    kmax_final: float = setting(0.8, "band at the end of the base schedule, fraction of training Nyquist",
                                cli=False)
    seed: int = setting(0, "random seed (batch order, noise, initialisation)")
    noise_particles: int = setting(1000, "particles used to estimate the scale and the noise spectrum", cli=False)
    rigidity_cells: int = setting(2048, "mesh cells sampled per step to estimate the rigidity mean (all cells when "
                                        "the mesh has fewer)")
    search_start: int = setting(1, "first epoch that begins with a latent search: every particle's latent becomes "
                                   "its posterior mean over a grid of maps decoded by the current model (0 searches "
                                   "before any training, which only helps when the model is already good)")
    search_every: int = setting(1, "epochs between latent searches (0: never during training, latents then move "
                                   "only by their per-visit gradient steps)")
    search_points: int = setting(0, "grid points per latent axis of a search (K≥3 uses points² quasi-random "
                                    "points); the final search uses about twice as many",
                                 default_text="0: 15 for K=1, 9 for K≥2")
    final_search: bool = setting(True, "the finer latent search after the last epoch (the latents written out)")
    # A lower band makes the search cheaper (decoded box³ and slice area) at some cost in latent accuracy:
    # docs/flex_training.md has the figures
    search_kmax: float = setting(1.0, "band of the latent searches during training, as a fraction of the training "
                                      "Nyquist, capped by the epoch's band; the final search uses the final band. A "
                                      "lower band (e.g. 0.5) makes the searches cheaper at some cost in latent "
                                      "accuracy", default_text="1: the epoch's band")

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
