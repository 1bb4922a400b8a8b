"""The README tutorial as a script: builds and runs the whole flexplugin workflow in a Scipion project.

simulate → 3D variability analysis → 3D variability display (simple, intermediates, cluster) → 3D flex mesh
prep → 3D flex training seeded from 3DVA → 3D flex generate → 3D flex reconstruction, with the settings the
README walks through in the GUI. Run it with Scipion's Python (`scipion3 python -m flexplugin.tutorial`),
then open the project in the GUI (`scipion3 project flexplugin_tutorial`) to look at every result. The
test suite runs the same chain with the tiny preset (tests/scipion/test_scipion_workflow.py), so the tutorial
cannot silently rot.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """Sizes of one tutorial run (everything else is a protocol default)."""

    particles: int = 2000
    box: int = 64
    apix: float = 2.0
    snr: float = 0.1
    stack_size: int = 1000
    va_components: int = 2
    va_iterations: int = 20
    va_filter: float = 8.0
    display_frames: int = 9
    mesh_cells: int = 12
    latents: int = 2
    seed_components: str = "1 2"
    training_box: int = 32
    epochs: int = 16
    layers: int = 6
    hidden: int = 64
    generate_frames: int = 9
    atlas_grid: int = 7
    recon_iterations: int = 20
    recon_batch: int = 128
    recon_noflex: bool = True
    cluster_count: int = 4
    extra: dict = field(default_factory=dict)


PRESETS = {
    # the README's tutorial: the built-in example at its demo size (a GPU makes it a matter of minutes)
    "tutorial": Preset(),
    # the same chain at test size (CI, no GPU): a few minutes on 2 CPU cores
    "tiny": Preset(particles=300, box=32, apix=4.0, snr=0.5, stack_size=120, va_components=3, va_iterations=4,
                   va_filter=12.0, display_frames=3, mesh_cells=8, training_box=16, epochs=2, layers=2, hidden=16,
                   generate_frames=3, atlas_grid=3, recon_iterations=2, recon_batch=100, cluster_count=3),
}


def _point(pointer, prot, output: str | None = None) -> None:
    """Point a PointerParam at a protocol (or at one of its outputs), as picking it in the form does."""
    pointer.set(prot)
    if output:
        pointer.setExtended(output)


class TutorialRun:
    """Adds the tutorial's protocols to a project one by one, validating and launching each like the GUI."""

    def __init__(self, project, preset: Preset, useGpu: bool = False, log=print):
        self.project, self.preset, self.log = project, preset, log
        self.device = dict(useGpu=useGpu, numberOfThreads=1)
        self.seconds: dict[str, float] = {}
        self.prots: dict[str, object] = {}

    def launch(self, name: str, prot):
        """Validate (the GUI's Execute does), run and wait; a failure raises with the protocol's error."""
        errors = prot.validate()
        if errors:
            raise RuntimeError(f"{name}: the form does not validate: {errors}")
        self.log(f"[tutorial] {name} ...")
        t0 = time.time()
        self.project.launchProtocol(prot, wait=True)
        self.seconds[name] = time.time() - t0
        if not prot.isFinished():
            out, err, _ = prot.getLogsAsStrings()
            raise RuntimeError(f"{name} ended as {prot.getStatus()}: {prot.getErrorMessage()}\n{out[-3000:]}\n"
                               f"{err[-3000:]}")
        self.log(f"[tutorial] {name} finished in {self.seconds[name]:.0f} s")
        self.prots[name] = prot
        return prot

    def run(self, steps: tuple[str, ...] | None = None) -> dict:
        """Run the chain (or the named steps of it, in order); returns {step name: finished protocol}."""
        from flexplugin.protocols import (
            FlexPluginProt3DVA,
            FlexPluginProt3DVADisplay,
            FlexPluginProtGenerate,
            FlexPluginProtMeshPrep,
            FlexPluginProtReconstruct,
            FlexPluginProtSimulate,
            FlexPluginProtTrain,
        )
        p, want = self.preset, (lambda s: steps is None or s in steps)

        def new(cls, objLabel: str, **params):
            """A new protocol with its run label (newProtocol ignores an objLabel keyword: set it explicitly)."""
            prot = self.project.newProtocol(cls, **params)
            prot.setObjLabel(objLabel)
            return prot

        sim = self.launch("simulate", new(
            FlexPluginProtSimulate, objLabel="simulate flexible particles", numberOfParticles=p.particles,
            boxSize=p.box, pixelSize=p.apix, snr=p.snr, seed=4, stackSize=p.stack_size))

        va = new(FlexPluginProt3DVA, objLabel="3DVA", numberOfComponents=p.va_components,
                 iterations=p.va_iterations, filterRes=p.va_filter, **self.device)
        _point(va.inputParticles, sim, "outputParticles")
        _point(va.inputMask, sim, "outputMask")
        _point(va.inputVolume, sim, "outputVolume")
        va = self.launch("3dva", va)

        if want("display"):
            for mode, label, extra in ((0, "simple", {}), (1, "intermediates", {}),
                                       (2, "cluster", {"frames": p.cluster_count})):
                disp = new(FlexPluginProt3DVADisplay, objLabel=f"3DVA display {label}", mode=mode,
                           **{"frames": p.display_frames, **extra}, **self.device)
                _point(disp.input3DVA, va)
                self.launch(f"display_{label}", disp)

        mesh = new(FlexPluginProtMeshPrep, objLabel="3D flex mesh", numberOfCells=p.mesh_cells)
        _point(mesh.inputVolume, va, "outputVolume")  # the consensus the 3DVA used
        _point(mesh.inputMask, sim, "outputMask")
        mesh = self.launch("mesh", mesh)

        train = new(FlexPluginProtTrain, objLabel="3D flex training (seeded by 3DVA)", numberOfLatents=p.latents,
                    initComponents=p.seed_components, trainingBox=p.training_box, epochs=p.epochs,
                    layers=p.layers, hiddenUnits=p.hidden, **self.device)
        _point(train.inputParticles, va, "outputParticles")  # the 3DVA coordinates seed the latents
        _point(train.inputVolume, va, "outputVolume")
        _point(train.meshRun, mesh)
        train = self.launch("train", train)

        if want("generate"):
            gen = new(FlexPluginProtGenerate, objLabel="3D flex generate", frames=p.generate_frames,
                      atlasGrid=p.atlas_grid, **self.device)
            _point(gen.inputTraining, train, "outputParticles")
            self.launch("generate", gen)

        if want("reconstruct"):
            rec = new(FlexPluginProtReconstruct, objLabel="3D flex reconstruction", iterations=p.recon_iterations,
                      batchSize=p.recon_batch, doNoflex=p.recon_noflex, **self.device)
            _point(rec.inputTraining, train)
            _point(rec.inputMask, sim, "outputMask")
            self.launch("reconstruct", rec)
        return self.prots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexplugin.tutorial", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default="flexplugin_tutorial", help="name of the new Scipion project")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tutorial",
                    help="tutorial: 2,000 particles, box 64 (the README); tiny: a quick check at test size")
    ap.add_argument("--gpu", action="store_true", help="run the engine jobs on GPU 0 (default: CPU)")
    a = ap.parse_args(argv)

    from pyworkflow.plugin import Domain
    from pyworkflow.project import Manager
    Domain.getPlugins()
    Domain.getProtocols()
    manager = Manager()
    if manager.hasProject(a.project):
        print(f"error: project {a.project!r} exists already: choose another --project or delete it "
              f"({os.path.join(manager.PROJECTS, a.project)})", file=sys.stderr)
        return 2
    project = manager.createProject(a.project)
    os.chdir(project.path)
    run = TutorialRun(project, PRESETS[a.preset], useGpu=a.gpu)
    run.run()
    total = sum(run.seconds.values())
    print(f"[tutorial] done in {total / 60:.1f} min. Open it with: scipion3 project {a.project} (pip installs: scipion project {a.project})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
