"""flexplugin tests (pytest, or unittest / Scipion's runner for the Scipion ones), in folders by floor:
engine/ (engine and command line, no Scipion), scipion/ (protocols, conversions, launching), reference/ (against
RELION, cisTEM, cryoDRGN), gui/ (the real GUI on Xvfb); helpers/ holds what they share.

`scipion_project` is imported first: it sets the environment of a throwaway Scipion before pyworkflow is
imported by anything else. The Scipion test modules are imported here so `python -m unittest tests` and
Scipion's runner find their test cases; pytest collects every test module directly.
"""
from .helpers import scipion_project  # noqa: F401, I001  (must stay first)
from .scipion.test_convert import *  # noqa: F401,F403
from .gui.test_gui import *  # noqa: F401,F403
from .scipion.test_scipion_3dva import *  # noqa: F401,F403
from .scipion.test_scipion_bad_metadata import *  # noqa: F401,F403
from .scipion.test_scipion_chaining import *  # noqa: F401,F403
from .scipion.test_scipion_faults import *  # noqa: F401,F403
from .scipion.test_scipion_flex import *  # noqa: F401,F403
from .scipion.test_scipion_flex_results import *  # noqa: F401,F403
from .scipion.test_scipion_plugin import *  # noqa: F401,F403
from .scipion.test_scipion_simulate import *  # noqa: F401,F403
from .scipion.test_scipion_workflow import *  # noqa: F401,F403
