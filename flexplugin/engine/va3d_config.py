"""3DVA settings (`flexplugin 3dva` and `flexplugin 3dva-display`), each declared once with its default, help text
and cryoSPARC key, torch-free so that the CLI builds its options and the Scipion protocols their defaults from here
(engine/options.py). It sits beside `va3d/` rather than in it because importing the `va3d` package loads torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .options import setting

__all__ = ["DISPLAY_MODES", "SCALES", "DisplayConfig", "VA3DConfig"]

SCALES = ("none", "input", "optimal")  # per-particle scale models of --scales
DISPLAY_MODES = ("simple", "intermediates", "cluster")  # 3dva-display --mode


@dataclass
class VA3DConfig:
    """Parameters of a 3DVA run; names follow the CLI options (cryoSPARC's var_3D keys in the metadata)."""

    k: int = setting(3, "number of components to solve", "var_K")
    iterations: int = setting(20, "EM iterations (--continue resumes a run up to a larger number)",
                              "var_num_iterations")
    filter_res: float = setting(8.0, "resolution (Å) at which the components are low-pass filtered; images are also "
                                     "Fourier-cropped to it for speed", "var_filter_res", required=True,
                                default_text="required; typically 4–8 Å", positive=True)
    filter_order: float = setting(1.5, "Butterworth order of the low-pass", "var_filter_order", positive=True)
    highpass_res: float | None = setting(None, "resolution (Å) below which variability is ignored (Butterworth "
                                               "high-pass)", "var_highpass_res", default_text="none", positive=True)
    highpass_order: float = setting(8.0, "Butterworth order of the high-pass", "var_highpass_order", positive=True)
    lam: float = setting(0.01, "stabilising coefficient, a fraction of the mean data weight per voxel; raise it if "
                               "components show artefacts", "var_lambda", option="--lambda")
    scales: str = setting("optimal", "per-particle scale: none (one global scale), input (rlnCtfScalefactor), "
                                     "optimal (refitted every iteration)", "var_use_scales", choices=SCALES)
    white_noise: bool = setting(False, "use a white noise model instead of the coloured per-shell one",
                                "var_use_white_noise")
    gram_schmidt: bool = setting(True, "the orthogonalisation and ordering of the components", "var_use_gramschmidt")
    box_crop: int | None = setting(None, "working box in pixels", "var_N",
                                   default_text="smallest box whose Nyquist reaches --filter-res")
    num_particles: int | None = setting(None, "only use the first N particles", "var_num_particles",
                                        default_text="all")
    px_em: bool = setting(True, "the parameter-expansion step of the EM (plain EM without it)")
    batch_size: int = setting(256, "images per batch")
    seed: int = setting(0, "random seed of the initial components")
    device: str = setting("cpu", "torch device of the run (the CLI sets it from --device)", cli=False)

    def key(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it."""
        d = asdict(self)
        for k in ("iterations", "batch_size", "device"):
            d.pop(k)
        return d


@dataclass
class DisplayConfig:
    """Parameters of a 3DVA display (va3d/display.py); names follow the CLI options (cryoSPARC's var_3D_disp keys
    in the metadata). The filter orders default to the analysis's own (VA3DConfig)."""

    mode: str = setting("simple", "output mode: a linear series, reconstructions in a rolling window, or k-means "
                                   "clusters", "var_output_mode", choices=DISPLAY_MODES)
    frames: int = setting(20, "frames per component, or clusters", "var_num_frames")
    range_percentile: float = setting(3.0, "clip the coordinate range at this low/high percentile",
                                      "var_range_percentile")
    components: str | None = setting(None, 'comma-separated component indices to use, e.g. "0,2"',
                                     "var_component_filter", default_text="all")
    filter_res: float | None = setting(None, "low-pass the output volumes at this resolution (Å)", "var_filter_res",
                                       positive=True, default_text="none")
    filter_order: float = setting(VA3DConfig.filter_order, "Butterworth order of the low-pass", positive=True)
    highpass_res: float | None = setting(None, "high-pass the output volumes at this resolution (Å)",
                                         "var_highpass_res", positive=True, default_text="none")
    highpass_order: float = setting(VA3DConfig.highpass_order, "Butterworth order of the high-pass", positive=True)
    downsample: int | None = setting(None, "Fourier-crop output volumes to this box", "var_N",
                                     default_text="full box")
    crop: int | None = setting(None, "crop output volumes to this box after downsampling", "var_M",
                               default_text="no crop")
    flip_hand: bool = setting(False, "flip the hand of the output volumes", "var_vol_flip")
    width: float = setting(2.0, "intermediates: window width in frames; >0 triangular, 0 top-hat, -1 equal-count "
                                "bins", "var_intermediate_width")
    skip_reconstruction: bool = setting(False, "cluster/intermediates: write the particle subsets only",
                                        "var_skip_reconstruction")
    frame_particles: bool = setting(False, "intermediates: also write a STAR of the particles of each frame",
                                    "var_intermediate_output_frame_particles")
    batch_size: int = setting(VA3DConfig.batch_size, "images per batch")
    seed: int = setting(0, "seed of k-means and of half-set splits")
    max_memory_gb: float = setting(2.0, "memory for reconstruction accumulators; more frames than fit are done in "
                                        "extra passes")
    device: str = setting("cpu", "torch device of the display (the CLI sets it from --device)", cli=False)
