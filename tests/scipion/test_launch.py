"""Launching several processes: `--gpus` (flexplugin/launch.py), the torchrun command lines Scipion protocols
give runJob (protocols/protocol_base.py), and the SLURM host template of docs/distributed.md rendered as
pyworkflow renders it.

The command lines are checked as the programs that read them see them: Scipion's own buildRunCommand fills in
the GPU ids, a shell splits the line, torchrun's own parser reads its part and flexplugin's parser the job's.
Two runs start real processes on the CPU (about 15 s each): `--gpus 0,1 --cpu-fallback` and the rendered SLURM
script with stand-ins for srun and scontrol.
"""
from __future__ import annotations  # noqa: I001  (scipion_project must be imported first)

from ..helpers import scipion_project  # noqa: F401  (sets up Scipion's environment before pyworkflow is imported)

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexplugin import launch
from flexplugin.cli import DISTRIBUTED_COMMANDS, build_parser, main
from flexplugin.engine.errors import InputError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _plugins():
    scipion_project.loadPlugins()  # protocols know their plugin (the queue's submit dictionary names it)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from flexplugin.engine.simulate import SimConfig, simulate_dataset
    out = tmp_path_factory.mktemp("launch_data")
    simulate_dataset(SimConfig(n=80, box=24, apix=5.0, snr=1.0, seed=5, stack_size=80), out, progress=lambda s: None)
    return out


# ------------------------------------------------------------------------------------------ --gpus
def test_gpu_ids():
    assert launch.gpu_ids("0,1,2,3") == [0, 1, 2, 3]
    assert launch.gpu_ids("2 3") == [2, 3]  # Scipion's %(GPU)s: ids separated by spaces
    assert launch.gpu_ids(" 1 , 0 ") == [1, 0]
    for bad, why in (("", "empty"), ("0,x", "whole numbers"), ("-1", "start at 0"), ("1,1", "twice")):
        with pytest.raises(InputError, match=why):
            launch.gpu_ids(bad)


def test_rank_device(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert launch.rank_device("auto", [3]) == "cuda:3"
    assert launch.rank_device("cpu", None) == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.rank_device("auto", [2, 5]) == "cuda:5"  # the id of this process's LOCAL_RANK
    with pytest.raises(InputError, match="3 GPU ids but torchrun started 2 processes"):
        launch.rank_device("auto", [0, 1, 2])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch.rank_device("cuda", None) == "cuda:1"  # plain torchrun: the GPU of LOCAL_RANK
    assert launch.rank_device("cpu", None) == "cpu"


def test_gpus_start_torchrun_with_the_job(monkeypatch, tmp_path):
    """Several ids on a machine with GPUs: torchrun gets one process per id and the job's own arguments, --gpus
    included (each process takes its id); what torchrun's own parser makes of them is checked too."""
    for k in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    calls = []
    monkeypatch.setattr(launch, "launch_torchrun", lambda n, argv: calls.append((n, argv)) or 0)
    argv = ["3dva-display", "--run", "R", "--out", str(tmp_path / "o"), "--mode", "cluster", "--gpus", "1,3"]
    assert main(argv) == 0
    assert calls == [(2, argv)]
    from torch.distributed.run import get_args_parser
    t = get_args_parser().parse_args(launch.torchrun_args(2, argv))
    assert (t.standalone, t.nproc_per_node, t.module, t.training_script) == (True, "2", True, "flexplugin")
    assert t.training_script_args == argv  # '--' kept torchrun from taking --run for its --run-path
    job = build_parser().parse_args(t.training_script_args)
    assert (job.command, job.run, job.gpus) == ("3dva-display", "R", "1,3")
    # ids beyond the GPUs present, and jobs that do not run data-parallel, stop before any work
    assert main(["3dva-display", "--run", "R", "--out", str(tmp_path / "o"), "--gpus", "3,4"]) == 2
    assert main(["flex-generate", "--model", "M", "--out", str(tmp_path / "g"), "--gpus", "0,1"]) == 2
    assert main(["reconstruct", "--particles", "P", "--out", str(tmp_path / "r"), "--gpus", "0,1", "--device",
                 "cpu"]) == 2
    assert len(calls) == 1


def test_gpus_on_a_cpu_machine(data, tmp_path, capfd, monkeypatch):
    """No GPU: an error line naming what is missing (exit 2, nothing written); with --cpu-fallback a WARNING and
    the same number of processes on the CPU, a real data-parallel run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["reconstruct", "--particles", str(data / "particles.star"), "--gpus", "0,1"]
    assert main([*args, "--out", str(tmp_path / "no")]) == 2
    err = capfd.readouterr().err
    assert "error: --gpus 0,1 asks for 2 GPUs but no GPU is visible" in err and "--cpu-fallback" in err
    assert not (tmp_path / "no" / "map.mrc").exists()
    r = subprocess.run([sys.executable, "-m", "flexplugin", *args, "--out", str(tmp_path / "yes"), "--cpu-fallback",
                        "--threads", "1"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("WARNING: --gpus 0,1 asks for 2 GPUs") == 1
    info = json.loads((tmp_path / "yes" / "reconstruct.json").read_text())
    assert (info["world_size"], info["particles_per_rank"]) == (2, 40)


def test_failed_processes_give_their_exit_status(data, tmp_path):
    """Every process refuses the input: the job's status is theirs (2), and their error line is the last one."""
    r = subprocess.run([sys.executable, "-m", "flexplugin", "reconstruct", "--particles", str(tmp_path / "none.star"),
                        "--out", str(tmp_path / "o"), "--gpus", "0,1", "--cpu-fallback"], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 2
    assert "error: particle STAR file not found" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ Scipion
def _protocol(cls, gpus: str):
    prot = cls()
    prot.useGpu.set(True)
    prot.gpuList.set(gpus)
    return prot


def _run_engine_line(prot, subcommand: str, args: list) -> tuple[str, dict]:
    """What runJob would run: runEngine's program and line through Scipion's buildRunCommand with the step's
    GPU list (as StepExecutor.runJob passes it), and the environment."""
    from pyworkflow.utils.process import buildRunCommand
    seen = {}
    prot.runJob = lambda program, line, **kw: seen.update(program=program, line=line, env=kw["env"])
    prot.runEngine(subcommand, args)
    command = buildRunCommand(seen["program"], seen["line"], 1, gpuList=prot.getGpuList())
    return command, dict(seen["env"])


def test_scipion_several_gpus_run_torchrun():
    from flexplugin import Plugin
    from flexplugin.protocols import FlexPluginProt3DVA, FlexPluginProtGenerate
    from flexplugin.protocols.protocol_base import SRUN_ENV
    prot = _protocol(FlexPluginProt3DVA, "0 1 2 3")
    assert prot._validateGpu() == []
    assert prot.getDeviceArgs() == ["--gpus", "%(GPU)s"]
    args = ["--particles", "in dir/p.star", "--mask", "m.mrc", "--out", "out", "--filter-res", 8,
            *prot.getDeviceArgs()]
    command, env = _run_engine_line(prot, "3dva", args)
    words = shlex.split(command)
    assert words[:4] == [f"${{{SRUN_ENV}}}", Plugin.getPython(), "-m", "torch.distributed.run"]
    assert words[4:] == ["--nproc-per-node=4", "-m", "flexplugin.cli", "--", "3dva", "--particles", "in dir/p.star",
                         "--mask", "m.mrc", "--out", "out", "--filter-res", "8", "--gpus", "0 1 2 3"]
    assert (env["PET_NNODES"], env["PET_RDZV_BACKEND"], env["PET_RDZV_ENDPOINT"]) == ("1", "c10d", "localhost:0")
    # what torchrun (its options from the PET_* environment) and then each process make of it
    from torch.distributed.run import get_args_parser
    old = {k: os.environ.get(k) for k in env if k.startswith("PET_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("PET_")})
    try:
        t = get_args_parser().parse_args(words[4:])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (t.nnodes, t.rdzv_backend, t.rdzv_endpoint, t.nproc_per_node) == ("1", "c10d", "localhost:0", "4")
    assert launch.gpu_ids(build_parser().parse_args(t.training_script_args).gpus) == [0, 1, 2, 3]
    # one GPU: the plain CLI on cuda:<id>, as before; a job that runs on one GPU refuses several ids
    one = _protocol(FlexPluginProt3DVA, "2")
    command, env = _run_engine_line(one, "3dva", ["--out", "o", *one.getDeviceArgs()])
    assert shlex.split(command) == [*shlex.split(Plugin.getProgram()), "3dva", "--out", "o", "--device", "cuda:2"]
    assert "PET_NNODES" not in env or env["PET_NNODES"] == os.environ.get("PET_NNODES")
    gen = _protocol(FlexPluginProtGenerate, "0 1")
    assert "one GPU" in gen._validateGpu()[0]
    assert "twice" in _protocol(FlexPluginProt3DVA, "1 1")._validateGpu()[0]


def test_scipion_error_of_a_failed_torchrun_job(tmp_path):
    """The protocol's error is the failed process's own line, not the notice of a process torchrun stopped."""
    from flexplugin.protocols import FlexPluginProt3DVA
    log = tmp_path / "run.stderr"
    log.write_text("error: particle STAR file not found: p.star\nerror: rank 1 of 2 was stopped (SIGTERM from "
                   "torchrun: another process of this job failed, or the job was cancelled); ...\n")
    assert FlexPluginProt3DVA._engineError(str(log)) == "particle STAR file not found: p.star"
    log.write_text("error: rank 0 of 2 was stopped (SIGTERM from torchrun: another process of this job failed\n")
    assert FlexPluginProt3DVA._engineError(str(log)).startswith("rank 0 of 2 was stopped")


def test_scipion_protocols_of_distributed_jobs():
    """Every protocol allowed several GPUs runs a job the CLI runs data-parallel, and the display's too."""
    from flexplugin import protocols
    from flexplugin.protocols.protocol_base import SEVERAL_GPU_JOBS
    for name, job in SEVERAL_GPU_JOBS.items():
        prot = _protocol(getattr(protocols, name), "0 1")
        assert prot.allowsSeveralGpus() == (job in DISTRIBUTED_COMMANDS), name
    assert _protocol(protocols.FlexPluginProt3DVADisplay, "0 1")._validateGpu() == []


# ------------------------------------------------------------------------------------------ SLURM
def _hosts_conf_block() -> str:
    text = DOCS.read_text()
    m = re.search(r"```ini\n(\[slurm-gpu\].*?)```", text, re.S)
    assert m, "docs/distributed.md lost its hosts.conf block"
    return m.group(1)


def _render_slurm_script(tmp_path: Path, job: str, args: list, gpus: str, nodes: str) -> str:
    """The submission script of one queued engine job, made as pyworkflow makes it: HostConfig.load reads the
    hosts.conf, the submit dictionary is the queue's defaults updated with the protocol's (the queue dialog's
    values included), JOB_COMMAND comes from buildRunCommand with the renumbered GPU list, and the template is
    filled with `template % submitDict` (QueueStepExecutor.runJob, launch._submit)."""
    from pyworkflow.protocol.hosts import HostConfig
    from pyworkflow.protocol.protocol import anonimizeGPUs
    from pyworkflow.utils.process import buildRunCommand

    from flexplugin.protocols import FlexPluginProt3DVA
    conf = tmp_path / "hosts.conf"
    conf.write_text(_hosts_conf_block())
    host = HostConfig.load(str(conf))["slurm-gpu"]
    prot = _protocol(FlexPluginProt3DVA, gpus)
    prot.setHostConfig(host)
    prot._useQueue.set(True)
    prot.setQueueParams(["gpu", {"NODES": nodes, "JOB_MAX_HOURS": "6", "QUEUE_FOR_JOBS": "Y"}])
    seen = {}
    prot.runJob = lambda program, line, **kw: seen.update(program=program, line=line)
    prot.runEngine(job, args + prot.getDeviceArgs())
    submit = dict(host.getQueuesDefault())
    submit.update(prot.getSubmitDict())
    submit["JOB_SCRIPT"] = str(tmp_path / "job.job")
    submit["JOB_LOGS"] = str(tmp_path / "job")
    submit["JOB_COMMAND"] = buildRunCommand(seen["program"], seen["line"], 1, host,
                                            gpuList=anonimizeGPUs(prot.getGpuList()), context=submit)
    return host.getSubmitTemplate() % submit


def test_slurm_template_renders_a_torchrun_per_node(tmp_path):
    from flexplugin import Plugin
    script = _render_slurm_script(tmp_path, "flex-train", ["--out", "train"], "4 5 6 7", "3")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=3", "--ntasks-per-node=1", "--gres=gpu:4", "--partition=gpu", "--time=6:00:00"):
        assert f"#SBATCH {directive}" in lines
    assert "export PET_NNODES=$SLURM_NNODES PET_RDZV_BACKEND=c10d PET_RDZV_ID=$SLURM_JOB_ID" in lines
    assert any(ln.startswith("export PET_RDZV_ENDPOINT=$(scontrol show hostnames") and ln.endswith(
        ":$((29500 + SLURM_JOB_ID % 1000))") for ln in lines)
    cmd = shlex.split(lines[-1])
    assert cmd[:4] == ["${FLEXPLUGIN_SRUN}", Plugin.getPython(), "-m", "torch.distributed.run"]
    # under the queue Scipion renumbers the form's GPUs from 0: the node's GPUs as SLURM shows them
    assert cmd[4:] == ["--nproc-per-node=4", "-m", "flexplugin.cli", "--", "flex-train", "--out", "train", "--gpus",
                       "0 1 2 3"]


def test_slurm_script_runs_the_job_through_the_rendezvous(data, tmp_path):
    """The rendered script itself, run by bash on this machine as one node: a stand-in srun runs its command once
    (as on each node), scontrol names this host; torchrun meets its peers through the c10d rendezvous the script
    exports and runs the job in two CPU processes (--cpu-fallback: no GPU here)."""
    out = tmp_path / "rec"
    script = _render_slurm_script(tmp_path, "reconstruct", ["--particles", str(data / "particles.star"), "--out",
                                                            str(out), "--threads", "1"], "0 1", "1")
    (tmp_path / "job.sh").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*" >&2\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    env = {k: v for k, v in ENV.items() if not k.startswith("PET_") and k != "FLEXPLUGIN_SRUN"}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1",
                "SLURM_JOB_ID": str(40000 + os.getpid() % 900), "FLEXPLUGIN_CPU_FALLBACK": "1"})
    r = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1" in r.stderr  # torchrun went through srun once
    info = json.loads((out / "reconstruct.json").read_text())
    assert (info["world_size"], info["particles_per_rank"]) == (2, 40)
