"""A private X display (Xvfb) for the GUI tests and scripts/screenshots.py, and helpers to draw Tk and grab it.

Xvfb comes from Debian's `xvfb` (plus `x11-xkb-utils` for its keymap); scripts/test_setup.sh installs both when
it can. Without them the GUI tests skip on a developer machine and fail under CI=true, like the oracle tests.
No Scipion or pyworkflow import here, so the screenshot script can use it too.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

__all__ = ["Xvfb", "xvfbMissing", "requireXvfb", "RootLogging", "pump", "grab", "grabWidget", "isBlank",
           "runTinyWorkflow"]

SCREEN = (1400, 900)
_HINT = "install Debian's xvfb and x11-xkb-utils (`make test-setup` does it as root)"


def xvfbMissing() -> str | None:
    """Why the GUI cannot run here (no Xvfb, no xkbcomp, no tkinter), or None when it can."""
    for program in ("Xvfb", "xkbcomp"):
        if shutil.which(program) is None:
            return f"program {program!r} on PATH"
    try:
        import tkinter  # noqa: F401
    except ImportError as exc:  # a Python built without Tk
        return f"tkinter ({exc})"
    return None


def requireXvfb() -> None:
    """Skip (locally) or fail (under CI=true) when the GUI cannot run here.

    unittest.SkipTest and RuntimeError, so both pytest and Scipion's unittest runner understand it.
    """
    import unittest

    from ..helpers.refdata import in_ci
    what = xvfbMissing()
    if what is None:
        return
    msg = f"GUI test needs {what}; {_HINT}"
    if in_ci():
        raise RuntimeError(f"{msg} (CI=true: GUI tests must not be skipped)")
    raise unittest.SkipTest(msg)


class Xvfb:
    """An Xvfb server on a display number it picks itself (-displayfd), so parallel runs never collide.

    Use as a context manager, or start()/stop(); `display` is ':N' once started. DISPLAY is set while it runs
    and restored by stop().
    """

    def __init__(self, width: int = SCREEN[0], height: int = SCREEN[1], depth: int = 24):
        self.size = (width, height, depth)
        self.display: str | None = None
        self._proc: subprocess.Popen | None = None
        self._oldDisplay: str | None = None
        self._log = None

    def start(self, timeout: float = 30.0) -> Xvfb:
        """Start the server and wait until it has chosen its display."""
        read, write = os.pipe()
        w, h, d = self.size
        self._log = tempfile.TemporaryFile()
        cmd = ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{w}x{h}x{d}", "-nolisten", "tcp", "-noreset"]
        self._proc = subprocess.Popen(cmd, pass_fds=(write,), stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        os.close(write)
        number = b""
        deadline = time.monotonic() + timeout
        try:
            while not number.endswith(b"\n") and time.monotonic() < deadline:
                chunk = os.read(read, 16)  # blocks until Xvfb writes its number (or exits: EOF)
                if not chunk:
                    break
                number += chunk
        finally:
            os.close(read)
        if not number.strip().isdigit():
            self.stop()
            raise RuntimeError(f"Xvfb did not start: {self._output()}")
        self.display = f":{int(number)}"
        self._oldDisplay = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = self.display
        return self

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        """Stop the server (destroy every Tk window on it first) and restore DISPLAY."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.display is not None:
            if self._oldDisplay is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = self._oldDisplay
            self.display = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Xvfb:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RootLogging:
    """The root logger's level and handlers, to put back after a ProjectWindow (it sends the root logger to the
    project's log file), so later tests in the same process log as before."""

    def __init__(self):
        import logging
        root = logging.getLogger()
        self.level, self.handlers = root.level, list(root.handlers)

    def restore(self) -> None:
        import logging
        root = logging.getLogger()
        for h in list(root.handlers):
            if h not in self.handlers:
                root.removeHandler(h)
                h.close()
        for h in self.handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(self.level)


def closeAllWindows() -> None:
    """Destroy every Tk and matplotlib window (do it while the display still exists, before Xvfb stops)."""
    import tkinter

    import matplotlib.pyplot as plt
    plt.close("all")
    root = getattr(tkinter, "_default_root", None)
    if root is not None:
        try:
            root.destroy()
        except tkinter.TclError:
            pass


def pump(widget, seconds: float = 0.5) -> None:
    """Let Tk process its events (drawing, geometry) for a while, as a main loop would."""
    end = time.monotonic() + seconds
    while True:
        widget.update_idletasks()
        widget.update()
        if time.monotonic() >= end:
            break
        time.sleep(0.02)


def grab(display: str, bbox: tuple | None = None):
    """A screenshot of the display (or of bbox = (left, top, right, bottom)) as a Pillow RGB image."""
    from PIL import ImageGrab
    return ImageGrab.grab(bbox=bbox, xdisplay=display).convert("RGB")


def grabWidget(display: str, widget):
    """A screenshot of one Tk window (its area on the screen, clipped to the screen)."""
    widget.update_idletasks()
    x, y = max(widget.winfo_rootx(), 0), max(widget.winfo_rooty(), 0)
    right = min(x + widget.winfo_width(), widget.winfo_screenwidth())
    bottom = min(y + widget.winfo_height(), widget.winfo_screenheight())
    return grab(display, (x, y, right, bottom))


def isBlank(image, minColours: int = 8, minStd: float = 5.0) -> bool:
    """True when an image is (nearly) uniform: few distinct colours or almost no contrast."""
    import numpy as np
    arr = np.asarray(image.convert("RGB"))
    if arr.size == 0:
        return True
    colours = len(np.unique(arr.reshape(-1, 3), axis=0))
    return colours < minColours or float(arr.std()) < minStd


def runTinyWorkflow(project) -> dict:
    """The tutorial chain at its tiny preset (flexplugin.tutorial: simulate → 3DVA → its three displays → mesh →
    training seeded by the 3DVA → generate, reconstruction) plus a latent subset: a finished run of every protocol.

    Returns the finished protocols by step name.
    """
    from flexplugin.protocols import FlexPluginProtSubset
    from flexplugin.tutorial import PRESETS, TutorialRun

    from ..helpers import scipion_project as sp
    runs = TutorialRun(project, PRESETS["tiny"]).run()
    subset = project.newProtocol(FlexPluginProtSubset, mode=1, numberOfClusters=2, clusterIds="1")
    subset.setObjLabel("subset")
    sp.point(subset.inputParticles, runs["train"], "outputParticles")
    errors = subset.validate()
    if errors:
        raise AssertionError(f"{subset.getClassName()} does not validate: {errors}")
    runs["subset"] = sp.launch(project, subset)
    return runs
