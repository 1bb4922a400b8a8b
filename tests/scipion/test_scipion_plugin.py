"""flexplugin as Scipion sees it: plugin discovery, protocols, protocols.conf tree, citations, base logic."""
import configparser
import json
import os
import subprocess
import unittest

import pyworkflow as pw
import pyworkflow.protocol.params as params
from pyworkflow.plugin import Domain
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

import flexplugin
from flexplugin import Plugin
from flexplugin.protocols import FlexPluginProtBase, FlexPluginProtSimulate

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)

__all__ = ["TestPluginDiscovery", "TestProtocolsConf", "TestCitations", "TestBaseProtocol", "TestHelpTexts"]  # re-exported

PACKAGE_DIR = os.path.dirname(os.path.abspath(flexplugin.__file__))


def setUpModule():
    scipion_project.loadPlugins()


def _protocolsInConf(children: list) -> list[str]:
    """Protocol class names in a protocols.conf JSON tree."""
    names = []
    for c in children:
        if c.get("tag") == "protocol":
            names.append(c["value"])
        names += _protocolsInConf(c.get("children", []))
    return names


class GpuProbe(FlexPluginProtBase):
    """A protocol with the shared GPU fields, to check the device arguments (not part of the plugin)."""

    _label = "gpu probe"

    def _defineParams(self, form):
        self._defineGpuParams(form)
        form.addSection(label="Input")
        form.addParam("dummy", params.IntParam, default=1)


class TestPluginDiscovery(unittest.TestCase):
    def test_plugin_is_registered_under_its_package_name(self):
        plugins = Domain.getPlugins()
        self.assertIn("flexplugin", plugins)
        self.assertIs(plugins["flexplugin"], flexplugin)
        instance = flexplugin._pluginInstance
        self.assertIsInstance(instance, Plugin)
        self.assertEqual(instance.getName(), "flexplugin")
        self.assertEqual(os.path.realpath(instance.getPath()), os.path.realpath(PACKAGE_DIR))
        self.assertEqual(instance.validateInstallation(), [])

    def test_protocols_are_found_and_base_is_hidden(self):
        protocols = Domain.getProtocols()
        self.assertIs(protocols.get("FlexPluginProtSimulate"), FlexPluginProtSimulate)
        self.assertEqual(FlexPluginProtSimulate.getClassPackageName(), "flexplugin")
        self.assertEqual(FlexPluginProtSimulate.getClassLabel(), "flexplugin - simulate flexible particles")
        self.assertFalse(FlexPluginProtSimulate.isBase())
        self.assertTrue(FlexPluginProtBase.isBase())
        self.assertTrue(FlexPluginProtSimulate.isInstalled())

    def test_engine_program_runs(self):
        cmd = Plugin.getProgram().split() + ["--version"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=Plugin.getEnviron(), timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(flexplugin.__version__, out.stdout)


class TestProtocolsConf(unittest.TestCase):
    def test_conf_is_package_data_and_lists_every_protocol(self):
        path = os.path.join(flexplugin._pluginInstance.getPath(), "protocols.conf")
        self.assertTrue(os.path.exists(path), f"{path} missing: is protocols.conf installed as package data?")
        cp = configparser.ConfigParser()
        cp.optionxform = str
        cp.read(path)
        tree = json.loads(cp.get("PROTOCOLS", "Flexibility Hub"))
        listed = _protocolsInConf(tree)
        known = Domain.getProtocols()
        for name in listed:
            self.assertIn(name, known, f"protocols.conf lists unknown protocol {name}")
        ours = {n for n, c in known.items() if c.getClassPackageName() == "flexplugin" and not c.isBase()}
        self.assertEqual(ours - set(listed), set(), "protocols missing from protocols.conf")
        sections = {c["text"] for c in tree if c.get("tag") == "section"}
        allowed = {"Data preparation", "Landscape estimation", "Data analysis", "Map reconstruction", "Utilities"}
        self.assertLessEqual(sections, allowed)

    def test_scipion_tree_shows_simulate_under_utilities(self):
        from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig
        views = ProtocolTreeConfig.load(pw.Config.getDomain(), pw.Config.SCIPION_PROTOCOLS)
        self.assertIn("Flexibility Hub", views)
        hub = views["Flexibility Hub"]
        utilities = [c for c in hub.childs if c.tag == "section" and c.text == "Utilities"]
        self.assertEqual(len(utilities), 1)
        shown = [c.value for c in utilities[0].childs if c.tag == "protocol" and c.visible]
        self.assertIn("FlexPluginProtSimulate", shown)


class TestCitations(unittest.TestCase):
    def test_bibtex_entries(self):
        bib = flexplugin._bibtex
        self.assertEqual(bib["Punjani2021"]["journal"], "Journal of Structural Biology")
        self.assertEqual(bib["Punjani2021"]["pages"], "107702")
        self.assertTrue(bib["Punjani2021"]["doi"].endswith("10.1016/j.jsb.2021.107702"))
        self.assertEqual(bib["Punjani2023"]["journal"], "Nature Methods")
        self.assertEqual(bib["Punjani2023"]["pages"], "860--870")
        self.assertTrue(bib["Punjani2023"]["doi"].endswith("10.1038/s41592-023-01853-8"))
        self.assertIn("3DFlex", bib["Punjani2023"]["title"])


class TestBaseProtocol(unittest.TestCase):
    def test_device_arguments(self):
        prot = GpuProbe()
        prot.useGpu.set(False)
        self.assertEqual(prot.getDeviceArgs(), ["--device", "cpu"])
        self.assertEqual(prot._validateGpu(), [])
        prot.useGpu.set(True)
        prot.gpuList.set("1")
        self.assertEqual(prot.getDeviceArgs(), ["--device", "cuda:%(GPU)s"])
        # what Scipion's runJob does with the step's GPU list
        self.assertEqual(" ".join(prot.getDeviceArgs()) % {"GPU": "1"}, "--device cuda:1")
        self.assertEqual(prot._validateGpu(), [])
        prot.gpuList.set("0 1")
        self.assertIn("one GPU", prot._validateGpu()[0])

    def test_threads_arguments(self):
        prot = GpuProbe()
        self.assertEqual(prot.getThreadsArgs(), [])
        prot.numberOfThreads.set(4)
        self.assertEqual(prot.getThreadsArgs(), ["--threads", "4"])

    def test_simulate_form_validation(self):
        prot = FlexPluginProtSimulate()
        self.assertEqual(prot.validate(), [])
        prot.boxSize.set(33)
        self.assertTrue(any("even" in e for e in prot.validate()))
        prot.boxSize.set(8)
        self.assertTrue(prot.validate())
        prot.boxSize.set(32)
        prot.snr.set(0.0)
        self.assertTrue(prot.validate())


def _pluginProtocols() -> list[type]:
    """Every protocol class the plugin exports (the hidden base excluded): new protocols are covered too."""
    import inspect

    import flexplugin.protocols as mod
    return [c for _, c in inspect.getmembers(mod, inspect.isclass)
            if issubclass(c, FlexPluginProtBase) and not c.isBase()]


class TestHelpTexts(unittest.TestCase):
    def test_every_parameter_has_a_label_and_a_help_text(self):
        """Users read the help (the ? button) to learn units, defaults and when to change a value."""
        classes = _pluginProtocols()
        self.assertGreaterEqual(len(classes), 7)
        missing = []
        for cls in classes:
            prot = cls()
            for name, param in prot._definition.iterAllParams():
                if isinstance(param, params.ElementGroup):  # a row or box grouping other params
                    continue
                label, text = param.label.get(), param.help.get()
                if name in (USE_GPU, GPU_LIST):  # hidden: Scipion draws them in the form's header
                    label = label or name
                if not label or not text or len(text) < 40:
                    missing.append(f"{cls.__name__}.{name}: {text!r}")
        self.assertEqual(missing, [], "parameters without a useful help text")

    def test_every_protocol_has_a_docstring_summary_methods_and_citations(self):
        """The help of a protocol comes from its docstring; a new run's summary says it is not ready."""
        for cls in _pluginProtocols():
            with self.subTest(cls=cls.__name__):
                self.assertGreater(len((cls.__doc__ or "").strip()), 80)
                prot = cls()
                self.assertTrue(prot._summary(), "an unfinished run's summary must say so")
                self.assertIsInstance(prot._methods(), list)
                for key in prot._citations():
                    self.assertIn(key, flexplugin._bibtex)


if __name__ == "__main__":
    unittest.main()
