#!/usr/bin/env python
"""Regenerate the README's GUI screenshots (docs/images/gui_*.png) from a real, headless Scipion session.

Runs a workflow in a throwaway project, opens it in pyworkflow's ProjectWindow on a private Xvfb display with the
Flexibility Hub view, and grabs the screenshots below. Two workflows (--preset):

  tiny      (default) the tiny test workflow (tests/gui/gui_display.runTinyWorkflow: the tutorial chain at its tiny
            preset plus a latent subset; 300 particles, about a minute on 2 CPU cores)
  tutorial  the README tutorial (flexplugin.tutorial.TutorialRun, PRESETS["tutorial"]: 2,000 particles, box 64,
            16 epochs; the reconstruction shortened to 5 flex iterations without the rigid baseline, enough for
            pictures; about 20 minutes on 2 CPU cores, 15 of them the reconstruction): the README's screenshots

The screenshots:

  gui_project.png      the project window: our protocols in the Flexibility Hub tree, the finished workflow graph
  gui_form_train.png   the 3D flex training form (a copy of the finished run, inputs filled in)
  gui_viewer_train.png the 3D flex training viewer and its latent plot

Usage: .venv/bin/python scripts/screenshots.py [--preset tiny|tutorial] [--out docs/images]
       (needs Xvfb: Debian's xvfb, x11-xkb-utils)
Set FLEXPLUGIN_KEEP_TEST_PROJECTS=1 to keep the throwaway project (its folder is printed); --reuse PROJECT_DIR then
grabs the screenshots again from that finished project without running anything.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 300_000


def _testHelpers():
    """tests.helpers.scipion_project and tests.gui.gui_display, without running tests/scipion/__init__.py (which imports
    every test)."""
    if "tests" not in sys.modules:
        pkg = types.ModuleType("tests")
        pkg.__path__ = [str(ROOT / "tests")]
        sys.modules["tests"] = pkg
    from tests.helpers import scipion_project  # noqa: I001  (first: sets the throwaway Scipion's env)
    from tests.gui import gui_display
    return scipion_project, gui_display


def save(image, path: Path, maxWidth: int = 1400) -> Path:
    """Save a screenshot as an optimised PNG (scaled down, then palette-quantised if it is still too big)."""
    from PIL import Image
    if image.width > maxWidth:
        image = image.resize((maxWidth, round(image.height * maxWidth / image.width)), Image.LANCZOS)
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        image.quantize(colors=256, method=Image.MEDIANCUT).save(path, optimize=True)
    print(f"screenshots: {path} ({image.width}x{image.height}, {path.stat().st_size // 1024} KB)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="output folder (default docs/images)")
    parser.add_argument("--preset", choices=("tiny", "tutorial"), default="tiny",
                        help="tiny: the 200-particle test workflow (a minute); tutorial: the README tutorial "
                             "(2,000 particles, box 64; about 20 minutes on 2 CPU cores)")
    parser.add_argument("--reuse", metavar="PROJECT_DIR",
                        help="a finished project kept from an earlier run (FLEXPLUGIN_KEEP_TEST_PROJECTS=1): "
                             "grab its screenshots without running the workflow")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    scipion_project, gd = _testHelpers()
    missing = gd.xvfbMissing()
    if missing:
        print(f"screenshots: needs {missing}; install Debian's xvfb and x11-xkb-utils", file=sys.stderr)
        return 2
    cwd = os.getcwd()
    with gd.Xvfb() as xvfb:
        try:
            return _shoot(scipion_project, gd, xvfb.display, out, args.preset, args.reuse)
        finally:
            gd.closeAllWindows()
            os.chdir(cwd)


def _runTutorial(project) -> dict:
    """The README tutorial's chain with its preset, the reconstruction shortened (the screenshots do not need it)."""
    import time
    from dataclasses import replace

    from flexplugin.tutorial import PRESETS, TutorialRun
    preset = replace(PRESETS["tutorial"], recon_iterations=5, recon_noflex=False)
    run = TutorialRun(project, preset, useGpu=False, log=lambda m: print(m, flush=True))
    t0 = time.time()
    runs = run.run()
    print("screenshots: tutorial run times: " + ", ".join(f"{k} {v:.0f} s" for k, v in run.seconds.items())
          + f"; total {(time.time() - t0) / 60:.1f} min", flush=True)
    return runs


def _finishedRuns(project) -> dict:
    """{step name: protocol} of a finished project (--reuse); "train" is the 3D flex training run."""
    from flexplugin.protocols import FlexPluginProtTrain
    runs = {}
    for prot in project.getRuns():
        if isinstance(prot, FlexPluginProtTrain):
            runs["train"] = prot
        runs.setdefault(prot.getObjLabel(), prot)
    if "train" not in runs:
        raise SystemExit(f"screenshots: no 3D flex training run in {project.getPath()}")
    return runs


def _verticalPanes(widget):
    """The ttk PanedWindow that splits the runs graph from the summary pane."""
    for child in widget.winfo_children():
        if child.winfo_class() == "TPanedwindow":
            return child
        found = _verticalPanes(child)
        if found is not None:
            return found
    return None


def _fitGraph(canvas, gd, maxSteps: int = 6) -> None:
    """Zoom the runs graph out (as Ctrl+wheel does) until every run fits in its pane, then scroll to its top left."""
    for step in range(maxSteps + 1):
        canvas.update_idletasks()
        box = canvas.bbox("all")
        if box is None:
            return
        x0, y0, x1, y1 = box
        print(f"screenshots: runs graph {box} in a {canvas.winfo_width()}x{canvas.winfo_height()} pane", flush=True)
        if step == maxSteps or (x1 - min(x0, 0) <= canvas.winfo_width() - 4
                                and y1 - min(y0, 0) <= canvas.winfo_height() - 4):
            break
        canvas.zoomerM(None)
        gd.pump(canvas, 0.3)
    canvas.xview("moveto", 0)
    canvas.yview("moveto", 0)


def _shoot(scipion_project, gd, display: str, out: Path, preset: str = "tiny", reuse: str | None = None) -> int:
    from unittest import mock

    import matplotlib.pyplot as plt
    from PIL import Image

    from pyworkflow.gui.form import FormWindow
    from pyworkflow.gui.project import ProjectWindow  # first: pyworkflow.gui.form alone is a circular import
    from pyworkflow.plugin import Domain
    from pyworkflow.project import Manager
    from pyworkflow.viewer import DESKTOP_TKINTER
    scipion_project.loadPlugins()
    if reuse:
        import pyworkflow as pw
        from pyworkflow.project import Project
        project = Project(pw.Config.getDomain(), os.path.abspath(reuse))
        project.load()
        os.chdir(project.path)
        runs = _finishedRuns(project)
    else:
        project = Manager().createProject("flexplugin_example")  # the name shows in the window header
        os.chdir(project.path)
        print(f"screenshots: running the {preset} workflow in {project.getPath()}", flush=True)
        runs = _runTutorial(project) if preset == "tutorial" else gd.runTinyWorkflow(project)
    settings = project.getSettings()
    settings.setProtocolView("Flexibility Hub")
    settings.write()

    # --- project window: protocol tree + workflow graph
    window = ProjectWindow(project.getPath())
    window.root.geometry("1400x900+0+0")
    graphHeight = 445  # the sash between runs graph (its toolbar included) and summary pane
    window.root.deiconify()
    gd.pump(window.root, 1.0)
    view = window.getViewWidget()
    panes = view.winfo_children()[0]  # the PanedWindow: protocol tree | runs
    panes.sash_place(0, 380, 0)  # wide enough for the longest protocol name in the tree
    _verticalPanes(view).sashpos(0, graphHeight)  # runs graph | summary
    view._selectItemProtocol(runs["train"])  # the summary pane shows the training run
    view._updateSelection()
    for node in view.runsGraph.getNodes():  # its box framed, as a click does
        if node.run is not None and node.run.getObjId() == runs["train"].getObjId() and hasattr(node, "item"):
            node.item.setSelected(True)
    gd.pump(window.root, 1.0)
    _fitGraph(view.runsGraphCanvas, gd)
    gd.pump(window.root, 1.0)
    save(gd.grabWidget(display, window.root), out / "gui_project.png")

    # --- the training form, inputs filled in (a copy of the finished run)
    train = project.copyProtocol(runs["train"])
    form = FormWindow(f"Protocol Run: {train.getClassName()}", train, lambda *a, **k: None, window)
    form.root.geometry("+0+0")
    form.root.deiconify()
    gd.pump(form.root, 1.0)
    save(gd.grabWidget(display, form.root), out / "gui_form_train.png")
    form.root.destroy()

    # --- the training viewer with its latent plot beside it
    def showWithoutMainloop(self, center=True, modal=False):
        self.root.geometry("+0+0")
        self.root.deiconify()

    viewerClass = Domain.findViewers(runs["train"], DESKTOP_TKINTER)[0]  # as "Analyze results" does
    viewer = viewerClass(project=project, protocol=runs["train"], parent=window)
    with mock.patch.object(FormWindow, "show", showWithoutMainloop):
        viewer.visualize(runs["train"], windows=window)
    vform = viewer.getWindow()
    gd.pump(vform.root, 0.5)
    before = set(plt.get_fignums())
    for v in viewer._showPlot("showLatents"):
        v.show()
    figWindows = [plt.figure(n).canvas.manager.window for n in sorted(set(plt.get_fignums()) - before)]
    x = vform.root.winfo_width() + 20
    for w in figWindows:  # no window manager: place them beside the form, not over it
        w.geometry(f"+{x}+0")
        x += w.winfo_width() + 20
    gd.pump(vform.root, 1.0)
    shots = [gd.grabWidget(display, w) for w in [vform.root] + figWindows]  # side by side on white
    gap = 12
    canvas = Image.new("RGB", (sum(s.width for s in shots) + gap * (len(shots) - 1), max(s.height for s in shots)),
                       "white")
    x = 0
    for shot in shots:
        canvas.paste(shot, (x, 0))
        x += shot.width + gap
    save(canvas, out / "gui_viewer_train.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
