"""One declaration per parameter: the settings dataclasses' fields (engine/options.py) give the CLI's options and
defaults and the Scipion forms' defaults; the three must agree, and every field must say what it does."""
import argparse
import importlib
from dataclasses import fields

import pytest

from flexplugin.cli import build_parser
from flexplugin.cli.common import config_from_args
from flexplugin.engine.flex.config import TrainConfig
from flexplugin.engine.flex.generate_config import GenerateConfig
from flexplugin.engine.flex.mesh_config import MeshConfig
from flexplugin.engine.flex.prep_config import PrepConfig
from flexplugin.engine.flex.reconstruct_config import ReconstructConfig
from flexplugin.engine.options import cli_fields, option_args, option_name
from flexplugin.engine.simulate_config import SimConfig
from flexplugin.engine.va3d_config import DisplayConfig, VA3DConfig
from flexplugin.engine.wiener_config import WienerConfig

from ..helpers import scipion_project  # Scipion's throwaway environment (tests/scipion/__init__.py sets it up first)

# per settings class: the subcommand with its required options, the protocol (module, class, field -> form map
# name; None: no protocol runs the command) and the command-line fields the form does not show (Scipion runs keep
# the engine's default for them) or shows otherwise (component and axis numbers from 1, which the protocol converts)
CASES = {
    TrainConfig: (["flex-train", "--particles", "p.star", "--volume", "v.mrc", "--mesh", "m.pkl", "--out", "o"],
                  ("protocol_flex_train", "FlexPluginProtTrain", "TRAIN_FORM"), {"rigidity_cells"}),
    ReconstructConfig: (["flex-reconstruct", "--model", "m.pt", "--particles", "p.star", "--out", "o"],
                        ("protocol_flex_reconstruct", "FlexPluginProtReconstruct", "RECONSTRUCT_FORM"), set()),
    PrepConfig: (["flex-prep", "--particles", "p.star", "--out", "o"],
                 ("protocol_flex_train", "FlexPluginProtTrain", "PREP_FORM"), set()),
    # the mesh prep protocol maps its form here (its module keeps no map: it passes values to meshEngineArgs)
    MeshConfig: (["flex-mesh", "--volume", "v.mrc", "--out", "o"],
                 ("protocol_flex_mesh", "FlexPluginProtMeshPrep",
                  {"cells": "numberOfCells", "rigidity_min": "rigidityMin", "stiffen_low_density": "stiffenLowDensity",
                   "mask_lowpass": "maskLowpass", "mask_threshold": "maskThreshold", "mask_dilate": "maskDilate",
                   "mask_pad": "maskPad"}), set()),
    VA3DConfig: (["3dva", "--particles", "p.star", "--mask", "m.mrc", "--out", "o", "--filter-res", "8"],
                 ("protocol_3dva", "FlexPluginProt3DVA", "VA3D_FORM"), set()),
    DisplayConfig: (["3dva-display", "--run", "r", "--out", "o"],
                    ("protocol_3dva_display", "FlexPluginProt3DVADisplay",
                     {"mode": "mode", "frames": "frames", "range_percentile": "rangePercentile",
                      "filter_res": "filterRes", "filter_order": "filterOrder", "highpass_res": "highpassRes",
                      "highpass_order": "highpassOrder", "downsample": "downsample", "crop": "crop",
                      "flip_hand": "flipHand", "width": "width", "skip_reconstruction": "skipReconstruction",
                      "batch_size": "batchSize", "seed": "seed", "max_memory_gb": "maxMemory"}),
                    {"components", "frame_particles"}),
    GenerateConfig: (["flex-generate", "--model", "m.pt", "--out", "o"],
                     ("protocol_flex_generate", "FlexPluginProtGenerate",
                      {"frames": "frames", "percentile": "percentile", "atlas": "doAtlas", "atlas_grid": "atlasGrid"}),
                     {"box", "atlas_axes"}),  # the form offers the training or full box, axes from 1
    SimConfig: (["simulate", "--out", "o"],
                ("protocol_simulate", "FlexPluginProtSimulate",
                 {"n": "numberOfParticles", "box": "boxSize", "apix": "pixelSize", "snr": "snr", "seed": "seed",
                  "hinge_deg": "hingeAmplitude", "twist_deg": "twistAmplitude", "stack_size": "stackSize"}),
                {"noise_seed"}),  # noise replicates are for benchmarks: command line only
    WienerConfig: (["reconstruct", "--particles", "p.star", "--out", "o"], None, set()),
}
CLASSES = list(CASES)
by_name = {"ids": lambda c: c.__name__}


def _actions(command: str) -> dict[str, argparse.Action]:
    """The subcommand's parser actions by dest."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize("cls", CLASSES, **by_name)
def test_every_field_has_help_text(cls):
    """A field without a sentence of help would give an option nobody can use."""
    short = [f.name for f in fields(cls) if len(f.metadata.get("help") or "") < 15]
    assert short == []


@pytest.mark.parametrize("cls", CLASSES, **by_name)
def test_cli_defaults_are_the_dataclass_defaults(cls):
    """The subcommand with only its required options parses to cls(), option by option, and each option's help
    states the default it has."""
    argv = CASES[cls][0]
    a = build_parser().parse_args(argv)
    assert config_from_args(cls, a) == cls()
    actions = _actions(argv[0])
    for f in cli_fields(cls):
        act = actions[f.name]
        assert act.option_strings == [option_name(f)]
        if isinstance(f.default, bool):
            assert getattr(a, f.name) is f.default
        elif f.metadata.get("required"):  # 3dva --filter-res: no default on the command line
            assert act.required and "required" in act.help, f.name
        else:
            assert act.default == f.default and type(getattr(a, f.name)) is type(f.default), f.name
            if f.default is not None or f.metadata.get("default_text"):
                assert "default " in act.help, f.name


def test_help_names_cryosparc_key_and_default():
    """The generated help of a field: its text, then '(cryoSPARC key; default value)'; --no-<name> for a boolean
    that is on by default."""
    actions = _actions("flex-train")
    assert actions["rigidity"].help.endswith("(flex_sv_lam; default 2)")
    assert actions["final_search"].option_strings == ["--no-final-search"]
    assert actions["final_search"].help.startswith("skip the finer latent search")
    assert _actions("3dva")["lam"].option_strings == ["--lambda"]
    train = build_parser().parse_args(CASES[TrainConfig][0])  # flex-train has the data prep's boxes too
    assert config_from_args(PrepConfig, train) == PrepConfig()


@pytest.mark.parametrize("cls", CLASSES, **by_name)
def test_engine_args_round_trip(cls):
    """Every command-line field set away from its default by option_args (what the protocols send) parses back to
    the same settings: the option names the protocols write are the ones the CLI reads."""
    changed = {}
    for f in cli_fields(cls):
        d = f.default
        changed[f.name] = (not d if isinstance(d, bool) else d + 1 if isinstance(d, int)
                           else d / 2 if isinstance(d, float) else None)
        if f.metadata.get("choices"):
            changed[f.name] = next(c for c in f.metadata["choices"] if c != d)
        if changed[f.name] is None:  # a None or text default: a value of the field's type
            changed[f.name] = 0.0125 if "float" in str(f.type) else "3" if "str" in str(f.type) else 3
    args = option_args(cls, changed)
    a = build_parser().parse_args(CASES[cls][0] + [str(x) for x in args])
    assert config_from_args(cls, a) == cls(**changed)


def test_engine_args_keep_defaults_and_refuse_unknown_fields():
    """None and a boolean at its default add no option (the engine's default applies); a typo fails loudly."""
    assert option_args(TrainConfig, {"lr_latent": None, "final_search": True}) == []
    assert option_args(TrainConfig, {"final_search": False, "k": 3}) == ["--no-final-search", "--k", 3]
    with pytest.raises(KeyError):
        option_args(TrainConfig, {"rigidty": 1.0})


@pytest.mark.parametrize("cls", CLASSES, **by_name)
def test_form_defaults_are_the_dataclass_defaults(cls):
    """The protocol's form defaults are the dataclass's (or empty, which keeps the engine's default), and every
    command-line field is on the form or listed as command-line only."""
    if CASES[cls][1] is None:
        pytest.skip(f"no protocol runs {CASES[cls][0][0]}")
    scipion_project.loadPlugins()
    (module, protocol, form_map), cli_only = CASES[cls][1:]
    mod = importlib.import_module(f"flexplugin.protocols.{module}")
    form = form_map if isinstance(form_map, dict) else getattr(mod, form_map)
    prot = getattr(mod, protocol)()  # its attributes hold the form's defaults, typed
    assert set(form) | cli_only == {f.name for f in cli_fields(cls)}
    for f in cli_fields(cls):
        if f.name in form:
            value = getattr(prot, form[f.name]).get()
            if f.metadata.get("choices") and value is not None:  # an EnumParam holds the index of the choice
                value = f.metadata["choices"][value]
            assert value is None or (value == f.default and type(value) is type(f.default)), f.name
