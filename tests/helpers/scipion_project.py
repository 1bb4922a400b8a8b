"""Throwaway headless Scipion installs and projects for tests (docs/algorithms.md §3).

Importing this module sets the environment a fresh Scipion needs (SCIPION_HOME with config/hosts.conf,
SCIPION_USER_DATA, SCIPION_DOMAIN=pwem, MPLBACKEND=Agg, SCIPION_TEST_NOSYNC=1, this interpreter first on
PATH) in a temporary folder. pyworkflow reads these variables when it is first imported, so import this
module before anything that imports pyworkflow, pwem or flexplugin (tests/scipion/__init__.py does). If pyworkflow
was imported earlier anyway, its already-evaluated settings are redirected to the same folder.

Set FLEXPLUGIN_KEEP_TEST_PROJECTS=1 to keep the folder (its path is printed) for inspection.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
import uuid

ROOT = tempfile.mkdtemp(prefix="flexplugin_scipion_")
SCIPION_HOME = os.path.join(ROOT, "scipion_home")
SCIPION_USER_DATA = os.path.join(ROOT, "ScipionUserData")
HOSTS_CONF = os.path.join(SCIPION_HOME, "config", "hosts.conf")
PYTHON_BIN = os.path.dirname(sys.executable)

ENVIRONMENT = {
    "SCIPION_HOME": SCIPION_HOME,
    "SCIPION_USER_DATA": SCIPION_USER_DATA,
    "SCIPION_DOMAIN": "pwem",
    "SCIPION_TEST_NOSYNC": "1",
    "SCIPION_PYTHON": sys.executable,  # protocol subprocesses must run in this environment
    "SCIPION_NOTIFY": "False",
    "MPLBACKEND": "Agg",
}


def _setEnvironment() -> None:
    os.makedirs(os.path.dirname(HOSTS_CONF), exist_ok=True)
    os.makedirs(SCIPION_USER_DATA, exist_ok=True)
    os.environ.update(ENVIRONMENT)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != PYTHON_BIN:
        os.environ["PATH"] = os.pathsep.join([PYTHON_BIN, path]) if path else PYTHON_BIN


def _redirectLoadedConfig() -> None:
    """pyworkflow was imported before us: point its evaluated Config at our folders."""
    import pyworkflow
    import pyworkflow.config as pwconfig
    cfg = pyworkflow.Config
    join = lambda *p: os.path.join(SCIPION_HOME, *p)  # noqa: E731
    values = {
        "SCIPION_HOME": SCIPION_HOME, "SCIPION_USER_DATA": SCIPION_USER_DATA,
        "SCIPION_SOFTWARE": join("software"), "SCIPION_TESTS": join("data", "tests"),
        "SCIPION_LOGS": os.path.join(SCIPION_USER_DATA, "logs"),
        "SCIPION_LOG": os.path.join(SCIPION_USER_DATA, "logs", "scipion.log"),
        "SCIPION_TESTS_OUTPUT": os.path.join(SCIPION_USER_DATA, "Tests"),
        "SCIPION_CONFIG": join("config", "scipion.conf"), "SCIPION_LOCAL_CONFIG": join("config", "scipion.conf"),
        "SCIPION_HOSTS": HOSTS_CONF, "SCIPION_PROTOCOLS": join("config", "protocols.conf"),
        "SCIPION_DOMAIN": "pwem", "SCIPION_TEST_NOSYNC": True, "SCIPION_HOME_DEFINED": True,
        "SCIPION_NOTIFY": False,
    }
    for k, v in values.items():
        setattr(cfg, k, v)
    pwconfig.PYTHON = sys.executable
    pyworkflow.PYTHON = sys.executable


def _writeHosts() -> None:
    from pyworkflow.protocol import HostConfig
    if not os.path.exists(HOSTS_CONF):
        HostConfig.writeBasic(HOSTS_CONF)


def _cleanup() -> None:
    if os.environ.get("FLEXPLUGIN_KEEP_TEST_PROJECTS"):
        print(f"flexplugin test projects kept in {ROOT}", file=sys.stderr)
        return
    shutil.rmtree(ROOT, ignore_errors=True)


_preloaded = "pyworkflow" in sys.modules
_setEnvironment()
if _preloaded:
    _redirectLoadedConfig()
_writeHosts()
atexit.register(_cleanup)


def loadPlugins() -> dict:
    """Register every installed plugin and its protocols, as Scipion does at start-up; returns the plugins."""
    from pyworkflow.plugin import Domain
    plugins = Domain.getPlugins()
    Domain.getProtocols()  # binds protocol classes to their plugin (getClassPackage, validateInstallation)
    return plugins


def newProject(prefix: str = "flexplugin"):
    """A new empty project with a unique name; the working directory moves into it (paths are relative)."""
    from pyworkflow.project import Manager
    loadPlugins()
    name = f"{prefix}_{time.strftime('%H%M%S')}_{uuid.uuid4().hex[:6]}"
    project = Manager().createProject(name)
    os.chdir(project.path)
    return project


def reloadProject(project):
    """The same project loaded afresh from disk (what a new Scipion session would see)."""
    from pyworkflow.project import Manager
    return Manager().loadProject(project.getName())


def launch(project, prot, check: bool = True):
    """Run a protocol like the GUI does (subprocess, waiting); on failure raise with its logs."""
    project.launchProtocol(prot, wait=True)
    if check and not prot.isFinished():
        out, err, _ = prot.getLogsAsStrings()
        raise AssertionError(f"protocol {prot.getRunName()} ended as {prot.getStatus()}: "
                             f"{prot.getErrorMessage()}\n--- stdout ---\n{out}\n--- stderr ---\n{err}")
    return prot


def runSimulate(project, **params):
    """Run FlexPluginProtSimulate (validated first) with small defaults; returns the finished protocol."""
    from flexplugin.protocols import FlexPluginProtSimulate
    kwargs = dict(numberOfParticles=200, boxSize=32, pixelSize=4.0, snr=0.5, seed=0)
    kwargs.update(params)
    prot = project.newProtocol(FlexPluginProtSimulate, objLabel="simulate", **kwargs)
    errors = prot.validate()
    if errors:
        raise AssertionError(f"simulate protocol does not validate: {errors}")
    return launch(project, prot)


# ----------------------------------------------------------------------------- helpers shared by the test modules
def point(pointer, obj, output: str | None = None) -> None:
    """Point a PointerParam at a protocol (or at one of its outputs) or at an object, as the form does."""
    pointer.set(obj)
    if output:
        pointer.setExtended(output)


def logText(prot) -> str:
    """A protocol's stdout and stderr logs, joined."""
    out, err, _ = prot.getLogsAsStrings()
    return out + err


def writeMap(path: str, box: int, apix: float, value: float = 0.5) -> str:
    """A constant cubic MRC map (for masks and volumes of the right or wrong size in validation tests)."""
    import mrcfile
    import numpy as np
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.full((box,) * 3, value, np.float32))
        m.voxel_size = apix
    return path


class ProjectRuns:
    """Mixin for test classes that run protocols in one project in setUpClass: validated, timed launches;
    tearDownClass prints the timings and restores the working folder. Set `cls.cwd`, `cls.seconds = {}` and
    `cls.project` in setUpClass; `timingsLabel` names the printed line."""

    timingsLabel = "protocol"

    @classmethod
    def tearDownClass(cls):
        print(f"{cls.timingsLabel} timings (s): { {k: round(v, 1) for k, v in cls.seconds.items()} }")
        os.chdir(cls.cwd)

    @classmethod
    def timed(cls, name: str, func):
        t0 = time.time()
        result = func()
        cls.seconds[name] = time.time() - t0
        return result

    @classmethod
    def launch(cls, name: str, prot):
        """Validate, then launch a protocol (timed)."""
        errors = prot.validate()
        if errors:
            raise AssertionError(f"{prot.getClassName()} ({name}) does not validate: {errors}")
        return cls.timed(name, lambda: launch(cls.project, prot))
