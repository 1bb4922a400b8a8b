"""Headless Scipion GUI under Xvfb: the project window, every protocol form and every viewer of flexplugin.

One tiny finished workflow (tests/gui/gui_display.runTinyWorkflow) in a real project, opened in pyworkflow's
ProjectWindow with the Flexibility Hub view on a private Xvfb display. Protocols and viewers are discovered from
flexplugin.protocols and flexplugin.viewers, so new ones are covered without editing this file. Needs Debian's
xvfb and x11-xkb-utils: skipped without them locally, failed under CI=true.
"""
import inspect
import os
import time
import unittest
from unittest import mock

import numpy as np
from PIL import Image

from pwem.viewers.views import DataView
from pyworkflow.protocol import Protocol
from pyworkflow.viewer import DESKTOP_TKINTER, MessageView, ProtocolViewer

import flexplugin.protocols
import flexplugin.viewers

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)
from .gui_display import RootLogging, Xvfb, closeAllWindows, grabWidget, isBlank, pump, requireXvfb, runTinyWorkflow

__all__ = ["TestGui"]  # what tests/scipion/__init__.py re-exports

VIEW = "Flexibility Hub"
# Parameters pyworkflow draws in the form's header with variables of its own (not in FormWindow.widgetDict).
HEADER_PARAMS = {"runName", "runMode", "hostName", "useGpu", "gpuList"}


def flexProtocolClasses() -> list:
    """Every protocol class flexplugin.protocols exports, except hidden bases (_label None)."""
    found = [c for c in vars(flexplugin.protocols).values()
             if inspect.isclass(c) and issubclass(c, Protocol) and c.__module__.startswith("flexplugin.protocols")]
    return sorted((c for c in found if not c.isBase()), key=lambda c: c.__name__)


def flexViewerClasses() -> list:
    """Every protocol viewer class flexplugin.viewers exports."""
    found = {c for c in vars(flexplugin.viewers).values()
             if inspect.isclass(c) and issubclass(c, ProtocolViewer) and c.__module__.startswith("flexplugin.viewers")}
    return sorted(found, key=lambda c: c.__name__)


def _treeItems(tree, parent: str = ""):
    """(item id, text) of every item below parent, depth first."""
    for item in tree.get_children(parent):
        yield item, tree.item(item, "text")
        yield from _treeItems(tree, item)


def _showWithoutMainloop(self, center=True, modal=False):
    """FormWindow.show without entering Tk's main loop (the test drives the events itself)."""
    self.root.deiconify()


def _pngStats(path: str) -> tuple:
    """(width, height, distinct colours, std) of an image file."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return arr.shape[1], arr.shape[0], len(np.unique(arr.reshape(-1, 3), axis=0)), float(arr.std())


class TestGui(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        requireXvfb()
        cls.cwd = os.getcwd()
        cls.seconds = {}
        cls.logging = RootLogging()
        cls.xvfb = None
        try:
            cls.xvfb = Xvfb().start()
            t0 = time.time()
            cls.project = scipion_project.newProject("gui")
            cls.runs = runTinyWorkflow(cls.project)
            cls.seconds["workflow"] = time.time() - t0

            t0 = time.time()
            settings = cls.project.getSettings()
            settings.setProtocolView(VIEW)
            settings.write()
            from pyworkflow.gui.project import ProjectWindow
            cls.window = ProjectWindow(cls.project.getPath())
            cls.window.root.geometry("1400x900+0+0")
            cls.window.root.deiconify()
            pump(cls.window.root, 1.5)
            cls.seconds["window"] = time.time() - t0
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        """Close every Tk and matplotlib window before the X server goes (Tk dies with its display)."""
        from pyworkflow.gui.plotter import Plotter
        print(f"GUI test timings (s): { {k: round(v, 1) for k, v in cls.seconds.items()} }")
        closeAllWindows()
        Plotter.setBackend("Agg")  # ProjectWindow switched matplotlib to TkAgg
        cls.logging.restore()
        if getattr(cls, "xvfb", None) is not None:
            cls.xvfb.stop()
        os.chdir(cls.cwd)

    def assertNotBlank(self, image, what: str) -> None:
        self.assertGreater(image.width * image.height, 100 * 100, f"{what}: tiny screenshot {image.size}")
        self.assertFalse(isBlank(image), f"{what}: the screenshot is blank")

    # ------------------------------------------------------------------ project window
    def test_discovery_finds_every_protocol_and_viewer(self):
        """The dynamic discovery the other tests rely on sees at least the protocols and viewers we know."""
        names = {c.__name__ for c in flexProtocolClasses()}
        self.assertLessEqual({"FlexPluginProtSimulate", "FlexPluginProtMeshPrep", "FlexPluginProtTrain",
                              "FlexPluginProtGenerate", "FlexPluginProtReconstruct", "FlexPluginProt3DVA",
                              "FlexPluginProt3DVADisplay"}, names)
        self.assertNotIn("FlexPluginProtBase", names)
        self.assertGreaterEqual(len(flexViewerClasses()), 6)

    def test_project_window_lists_every_protocol(self):
        """The rendered Flexibility Hub tree shows each protocol class by its label, visibly (not collapsed)."""
        view = self.window.getViewWidget()
        self.assertEqual(view.settings.getProtocolView(), VIEW)
        tree = view.protTree
        items = dict(_treeItems(tree))
        roots = [tree.item(i, "text") for i in tree.get_children("")]
        self.assertEqual(roots, [VIEW])
        byClass = {item.rsplit(".", 1)[-1]: item for item in items}
        for cls in flexProtocolClasses():
            with self.subTest(protocol=cls.__name__):
                self.assertIn(cls.__name__, byClass, f"{cls.__name__} is not in the {VIEW} tree")
                item = byClass[cls.__name__]
                self.assertEqual(items[item], cls.getClassLabel())
                self.assertTrue(tree.bbox(item), f"{cls.__name__} is in the tree but not drawn (collapsed?)")
        self.assertNotIn("FlexPluginProtBase", byClass)
        self.assertNotBlank(grabWidget(self.xvfb.display, self.window.root), "project window")

    def test_project_window_draws_the_workflow(self):
        """Every finished run of the workflow is a box in the runs graph."""
        view = self.window.getViewWidget()
        nodes = {n.getName() for n in view.runsGraph.getNodes()}
        for name, prot in self.runs.items():
            self.assertIn(str(prot.getObjId()), nodes, f"run {name} is not in the graph")

    # ------------------------------------------------------------------ forms
    def test_protocol_forms_open(self):
        """A new protocol of each class opens in its form, with a widget for every parameter, and draws."""
        from pyworkflow.gui.form import FormWindow
        for cls in flexProtocolClasses():
            with self.subTest(protocol=cls.__name__):
                prot = self.project.newProtocol(cls)
                form = FormWindow(f"Protocol Run: {cls.__name__}", prot, lambda *a, **k: None, self.window)
                try:
                    form.root.geometry("+0+0")
                    form.root.deiconify()
                    pump(form.root, 0.5)
                    self.assertTrue(form.root.winfo_ismapped())
                    params = {name for name, _ in prot.iterDefinitionAttributes()} - HEADER_PARAMS
                    self.assertTrue(params)
                    missing = params - set(form.widgetDict)
                    self.assertFalse(missing, f"no widget for {sorted(missing)}")
                    self.assertNotBlank(grabWidget(self.xvfb.display, form.root), f"{cls.__name__} form")
                finally:
                    form.root.destroy()

    # ------------------------------------------------------------------ viewers
    def test_viewers_open_and_show_their_figures(self):
        """Each flexplugin viewer is Scipion's viewer for a finished run; its form opens and every PNG view it
        offers is an existing, non-blank image that opens in a matplotlib window (table views: their file exists)."""
        import matplotlib.pyplot as plt

        from pyworkflow.gui.form import FormWindow
        from pyworkflow.plugin import Domain

        from flexplugin.viewers import PngView
        for viewerClass in flexViewerClasses():
            with self.subTest(viewer=viewerClass.__name__):
                runs = [p for p in self.runs.values() if isinstance(p, tuple(viewerClass._targets))]
                self.assertTrue(runs, f"no finished run for {viewerClass.__name__}")
                prot = runs[0]
                self.assertIn(viewerClass, Domain.findViewers(prot, DESKTOP_TKINTER))
                # the form's title: "missing -..." when Scipion cannot tell which plugin the viewer belongs to
                self.assertTrue(viewerClass.getClassLabel().startswith("flexplugin - "), viewerClass.getClassLabel())
                viewer = viewerClass(project=self.project, protocol=prot, parent=self.window)
                with mock.patch.object(FormWindow, "show", _showWithoutMainloop):
                    viewer.visualize(prot, windows=self.window)
                form = viewer.getWindow()
                try:
                    pump(form.root, 0.5)
                    self.assertTrue(form.root.winfo_ismapped())
                    self.assertNotBlank(grabWidget(self.xvfb.display, form.root), f"{viewerClass.__name__} form")
                    pngs = 0
                    for name, func in viewer._getVisualizeDict().items():
                        for view in func(name):
                            if isinstance(view, MessageView):  # ChimeraX not configured, mode-specific entries
                                continue
                            if isinstance(view, DataView):  # Scipion's table viewer (showj, from xmipp): not run
                                self.assertTrue(os.path.exists(view.getPath()), f"{name}: {view.getPath()}")
                                continue
                            self.assertIsInstance(view, PngView, f"{name}: {view}")
                            w, h, colours, std = _pngStats(view.getImagePath())
                            self.assertGreater(min(w, h), 50, f"{name}: {view.getImagePath()} is {w}x{h}")
                            self.assertGreater(colours, 8, f"{name}: {view.getImagePath()} is nearly uniform")
                            self.assertGreater(std, 5.0, f"{name}: {view.getImagePath()} has no contrast")
                            before = set(plt.get_fignums())
                            view.show()
                            opened = set(plt.get_fignums()) - before
                            self.assertEqual(len(opened), 1, f"{name}: no figure window")
                            fig = plt.figure(opened.pop())
                            window = fig.canvas.manager.window
                            pump(window, 0.3)
                            self.assertNotBlank(grabWidget(self.xvfb.display, window), f"{name} figure window")
                            plt.close(fig)
                            pngs += 1
                    self.assertGreater(pngs, 0, f"{viewerClass.__name__} showed no figure")
                finally:
                    form.root.destroy()
