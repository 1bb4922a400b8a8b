"""The Scipion Plugin class: variables, environment and how protocols call the engine."""
import os
import sys

import pwem
import pyworkflow.utils as pwutils

FLEXPLUGIN_PYTHON = "FLEXPLUGIN_PYTHON"


class Plugin(pwem.Plugin):
    """Registers flexplugin with Scipion. The engine runs in the Python named by FLEXPLUGIN_PYTHON
    (default: the Python running Scipion, where `pip install scipion-em-flexplugin` put torch)."""

    # pyworkflow takes a plugin's name and folder from its Plugin class's module (getName, getPath,
    # protocol labels, job submission), expecting the package itself: claim it, as if defined in __init__.py.
    __module__ = __package__

    _homeVar = ""
    _pathVars: list[str] = []  # nothing must exist beyond the Python package itself
    _url = "https://github.com/flexplugin/scipion-em-flexplugin"
    _supportedVersions: list[str] = []

    @classmethod
    def _defineVariables(cls) -> None:
        """FLEXPLUGIN_PYTHON: the Python that runs the engine (default: this one)."""
        cls._defineVar(FLEXPLUGIN_PYTHON, sys.executable)

    @classmethod
    def getPython(cls) -> str:
        """The Python interpreter that runs the engine (environment first, then Scipion's config)."""
        return os.environ.get(FLEXPLUGIN_PYTHON, cls.getVar(FLEXPLUGIN_PYTHON) or sys.executable)

    @classmethod
    def getProgram(cls) -> str:
        """The command protocols give to runJob; subcommand and options follow as arguments."""
        return f"{cls.getPython()} -m flexplugin.cli"

    @classmethod
    def getEnviron(cls) -> pwutils.Environ:
        """Environment of engine jobs: unbuffered output (live logs) and a headless matplotlib."""
        env = pwutils.Environ(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"})
        return env

    @classmethod
    def defineBinaries(cls, env) -> None:
        """Nothing to install beyond pip's dependencies."""
        pass  # pure Python: everything comes with pip
