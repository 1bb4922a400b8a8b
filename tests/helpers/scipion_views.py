"""What the Scipion-side tests share about the GUI's view of our protocols: where the Flexibility Hub places them,
and a viewer opened on a finished run as the GUI opens it."""
from __future__ import annotations

import unittest


def hub_sections() -> dict[str, str]:
    """{protocol class name: section} of the Flexibility Hub view, as the GUI reads it from protocols.conf."""
    import pyworkflow as pw
    from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig
    hub = ProtocolTreeConfig.load(pw.Config.getDomain(), pw.Config.SCIPION_PROTOCOLS)["Flexibility Hub"]
    return {c.value: s.text for s in hub.childs if s.tag == "section" for c in s.childs if c.tag == "protocol"}


def open_viewer(test: unittest.TestCase, prot, cls):
    """Viewer `cls` on protocol run `prot` of `test.project`, after checking that Scipion offers it for that run."""
    from pyworkflow.plugin import Domain
    test.assertIn(cls, Domain.findViewers(prot, "tkinter"))
    viewer = cls(project=test.project, protocol=prot)
    viewer.setProtocol(prot)
    return viewer
