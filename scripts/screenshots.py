#!/usr/bin/env python
"""Regenerate the README's GUI screenshots (docs/images/gui_*.png) from a real, headless Scipion session.

Runs the tiny test workflow (tests/gui_display.runTinyWorkflow: simulate → 3DVA → display → mesh → training →
subset, generate, reconstruction; about a minute on 2 CPU cores) in a throwaway project, opens it in pyworkflow's
ProjectWindow on a private Xvfb display with the Flexibility Hub view, and grabs:

  gui_project.png      the project window: our protocols in the Flexibility Hub tree, the finished workflow graph
  gui_form_train.png   the 3D flex training form (a copy of the finished run, inputs filled in)
  gui_viewer_train.png the 3D flex training viewer and its latent plot

Usage: .venv/bin/python scripts/screenshots.py [--out docs/images]   (needs Xvfb: Debian's xvfb, x11-xkb-utils)
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
    """tests.scipion_project and tests.gui_display, without running tests/__init__.py (which imports every test)."""
    if "tests" not in sys.modules:
        pkg = types.ModuleType("tests")
        pkg.__path__ = [str(ROOT / "tests")]
        sys.modules["tests"] = pkg
    from tests import gui_display, scipion_project  # scipion_project first sets the throwaway Scipion's env
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
            return _shoot(scipion_project, gd, xvfb.display, out)
        finally:
            _closeAll()
            os.chdir(cwd)


def _closeAll() -> None:
    """Destroy every Tk and matplotlib window while the display still exists."""
    import tkinter

    import matplotlib.pyplot as plt
    plt.close("all")
    root = getattr(tkinter, "_default_root", None)
    if root is not None:
        try:
            root.destroy()
        except tkinter.TclError:
            pass


def _shoot(scipion_project, gd, display: str, out: Path) -> int:
    from unittest import mock

    import matplotlib.pyplot as plt
    from pyworkflow.gui.project import ProjectWindow  # first: pyworkflow.gui.form alone is a circular import
    from pyworkflow.gui.form import FormWindow

    from PIL import Image
    from pyworkflow.plugin import Domain
    from pyworkflow.viewer import DESKTOP_TKINTER

    from pyworkflow.project import Manager
    scipion_project.loadPlugins()
    project = Manager().createProject("flexplugin_example")  # the name shows in the window header
    os.chdir(project.path)
    print(f"screenshots: running the tiny workflow in {project.getPath()}")
    runs = gd.runTinyWorkflow(project)
    settings = project.getSettings()
    settings.setProtocolView("Flexibility Hub")
    settings.write()

    # --- project window: protocol tree + workflow graph
    window = ProjectWindow(project.getPath())
    window.root.geometry("1400x900+0+0")
    window.root.deiconify()
    gd.pump(window.root, 1.0)
    view = window.getViewWidget()
    panes = view.winfo_children()[0]  # the PanedWindow: protocol tree | runs
    panes.sash_place(0, 400, 0)
    view._selectItemProtocol(runs["train"])
    view._updateSelection()
    gd.pump(window.root, 1.5)
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
