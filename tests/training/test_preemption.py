"""Runs that survive a preemption and a lost worker: checkpoints within epochs that resume
exactly, SIGTERM that stops cleanly, torchrun restarts that continue by themselves
(``--resume auto``), and two torchrun agents meeting on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, free_port
from test_distributed import EQUIVALENCE, _env, _metrics
from test_train import ROOT, digits_config  # tests/training is on the path (no __init__)

from cait.runtime import get_rng_state
from cait.training.checkpoint import load_checkpoint, save_checkpoint
from cait.training.engine import EpochPosition, _usable
from cait.training.optim import Optimisation
from cait.training.preemption import TrainingPreempted
from cait.training.run import train

EXIT_PREEMPTED = 75


def _signal_at_step(monkeypatch, stop_step: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to this process right after optimiser step ``stop_step`` (counted over
    the whole run, from 1)."""
    real = Optimisation.step

    def step_then_signal(self, model, step):
        lr = real(self, model, step)
        if step + 1 == stop_step:
            signal.raise_signal(sig)
        return lr

    monkeypatch.setattr(Optimisation, "step", step_then_signal)


# Random crops, colour jitter, mixup/cutmix (the recipe's), drop-path and an EMA are on:
# every RNG stream and the loader's order must continue where the checkpoint left them.
_SETTINGS = ("epochs=2", "model_args.drop_path_rate=0.1", "checkpoint_every_steps=4")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    train(digits_config(tmp, *_SETTINGS))
    return tmp / "run"


@pytest.mark.parametrize(
    "stop_step", [pytest.param(6, marks=pytest.mark.slow), 29]
)  # within epoch 1 (of 22 steps), within epoch 2
def test_sigterm_within_an_epoch_then_resume_auto_is_exact(
    uninterrupted, tmp_path, monkeypatch, caplog, stop_step
):
    with monkeypatch.context() as m:
        _signal_at_step(m, stop_step)
        with pytest.raises(TrainingPreempted, match=f"stopped by SIGTERM at step {stop_step}"):
            train(digits_config(tmp_path, *_SETTINGS))
    run = tmp_path / "run"
    state = load_checkpoint(run / "last.pt")
    assert state.run["step"] == stop_step and state.run["epoch_position"] is not None
    assert not (run / ".lock").exists()
    assert "SIGTERM received: finishing this step" in caplog.text
    result = train(digits_config(tmp_path, *_SETTINGS, "resume=auto"))
    assert result.completed
    assert_same_weights(run / "model.safetensors", uninterrupted / "model.safetensors")
    assert_same_weights(run / "model_ema.safetensors", uninterrupted / "model_ema.safetensors")
    assert _metrics(run) == _metrics(uninterrupted)


def test_checkpoints_within_epochs_every_n_steps(tmp_path, caplog):
    caplog.set_level("INFO")
    train(digits_config(tmp_path, *_SETTINGS, "epochs=1", "checkpoint_every_steps=5"))
    steps = [r.getMessage() for r in caplog.records if "within epoch 1" in r.getMessage()]
    assert steps and all(m.startswith(f"step {5 * (i + 1)}: wrote") for i, m in enumerate(steps))
    state = load_checkpoint(tmp_path / "run" / "last.pt")  # the epoch's end replaces them
    assert state.run["epoch_position"] is None and state.run["epoch"] == 0


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_with_loader_workers_resumes_exactly(tmp_path, monkeypatch):
    settings = (*_SETTINGS, "epochs=1", "data.workers=2")
    full = tmp_path / "full"
    train(digits_config(full, *settings))
    with monkeypatch.context() as m:
        _signal_at_step(m, 9)
        with pytest.raises(TrainingPreempted):
            train(digits_config(tmp_path, *settings))
    train(digits_config(tmp_path, *settings, "resume=auto"))
    assert_same_weights(tmp_path / "run" / "model.safetensors", full / "run" / "model.safetensors")


def test_a_second_signal_while_stopping_changes_nothing(uninterrupted, tmp_path, monkeypatch):
    real_save = torch.save

    def save_with_another_signal(obj, f):
        signal.raise_signal(signal.SIGTERM)  # arrives during the checkpoint's write
        real_save(obj, f)

    with monkeypatch.context() as m:
        _signal_at_step(m, 6)
        m.setattr(torch, "save", save_with_another_signal)
        with pytest.raises(TrainingPreempted, match="at step 6"):
            # no checkpoint every N steps: the preemption's is the first write
            train(digits_config(tmp_path, *_SETTINGS, "checkpoint_every_steps=null"))
    assert load_checkpoint(tmp_path / "run" / "last.pt").run["step"] == 6
    train(digits_config(tmp_path, *_SETTINGS, "resume=auto"))
    assert_same_weights(tmp_path / "run" / "model.safetensors", uninterrupted / "model.safetensors")


@pytest.mark.parametrize(
    "batches, micro, accum, fits",
    [(6, 4, 2, True), (6, 3, 2, False), (8, 4, 2, False), (4, 6, 1, False)],
)
def test_a_position_that_does_not_fit_the_epoch_restarts_it(batches, micro, accum, fits, caplog):
    """A mid-epoch position from a run with other data, batch size or accumulation: the
    epoch starts over with a warning (here the epoch has 8 batches)."""
    position = EpochPosition(batches, micro, 0.0, 4 * micro, 1.0, (), get_rng_state())
    assert _usable(position, 8, accum, epoch=0) is (position if fits else None)
    assert ("does not fit this run's 8 batches" in caplog.text) is not fits


def _position_with(**fields) -> list[dict]:
    rng = {"python": (3, (0,) * 625, None), "numpy": {}, "torch": torch.get_rng_state()}
    return [{**EpochPosition(4, 4, 0.0, 256, 1.0, (), rng).to_dict(), **fields}]


@pytest.mark.parametrize(
    "change",
    [
        {"epoch_position": 5},
        {"epoch_position": [7]},
        {"epoch_position": [{"batches": 4}]},
        {"epoch_position": _position_with(rng_at_start={})},
        {"epoch_position": _position_with(micro="4")},
        {"epoch_position": _position_with(skipped=[[1]])},
        {"epoch_position": _position_with(extra=1)},
        {"rng": {"python": "no state"}, "rng_ranks": None},
        {"rng": {"python": (3, (0,) * 625, None)}, "rng_ranks": None},
    ],
)
def test_a_malformed_position_or_rng_state_is_refused_in_one_line(uninterrupted, tmp_path, change):
    """A last.pt from elsewhere: its place in the epoch and its RNG states are checked
    before anything trains (a ValueError, which the CLI prints in one line)."""
    state = load_checkpoint(uninterrupted / "last.pt")
    crafted = tmp_path / "crafted.pt"
    save_checkpoint(dataclasses.replace(state, run={**state.run, **change}), crafted)
    with pytest.raises(ValueError, match="malformed"):
        train(digits_config(tmp_path, *_SETTINGS, f"resume={crafted}"))


def test_preempt_signals_are_checked():
    with pytest.raises(ValueError, match="SIGKILL"):
        digits_config(Path("/tmp"), "preempt_signals=[SIGKILL]")
    with pytest.raises(ValueError, match="checkpoint_every_steps"):
        digits_config(Path("/tmp"), "checkpoint_every_steps=0")


def _cli(run: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "cait", "train", "--recipe", "recipes/digits.yaml"]
    command += ["--data", "digits", "--output", str(run), "--no-progress"]
    sets = ["model_args.depth=1", "tensorboard=false", "threads=1", "checkpoint_every_steps=3"]
    return command + [a for s in sets for a in ("--set", s)] + list(extra)


def _wait_for_mid_epoch_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within an epoch in time"
        last = run / "last.pt"
        if last.exists() and load_checkpoint(last).run.get("epoch_position"):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run ended first: {proc.communicate()}")


@pytest.mark.slow
def test_sigterm_to_a_cli_run_exits_75_and_resume_auto_continues(tmp_path):
    run = tmp_path / "run"
    env = {**_env(), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        _cli(run, "--epochs", "2", "--set", "preempt_signals=[SIGTERM,SIGUSR1]"),
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_mid_epoch_checkpoint(run, proc)
        proc.send_signal(signal.SIGUSR1)  # a scheduler's warning signal, configured
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err.strip().splitlines()[-1].startswith("cait train: stopped by SIGUSR1 at step")
    assert "--resume auto" in err.strip().splitlines()[-1]
    resumed = subprocess.run(
        _cli(run, "--epochs", "2", "--resume", "auto"), cwd=ROOT, env=env, capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


# Under torchrun: each worker notes its pid (to be signalled), then runs the CLI.
_WORKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from cait.cli import main
    pids = Path(sys.argv[1])
    pids.mkdir(exist_ok=True)
    (pids / f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
    sys.exit(main(sys.argv[2:]))
    """
)


def _train_args(run: Path) -> list[str]:
    """``train ...`` of the 2-process runs compared here (2 x batch 64, --resume auto)."""
    train_args = _cli(run, "--epochs", "2", "--batch-size", "64")[3:]  # from "train" on
    return train_args + [a for s in EQUIVALENCE for a in ("--set", s)] + ["--resume", "auto"]


def _torchrun_args(tmp_path: Path, run: Path, *torchrun: str) -> list[str]:
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, str(worker)] + [
        str(tmp_path / "pids"),
        *_train_args(run),
    ]


def _kill_rank_mid_epoch(tmp_path: Path, run: Path, procs: list, rank: int, sig) -> None:
    _wait_for_mid_epoch_checkpoint(run, procs[0])
    pid = int((tmp_path / "pids" / f"rank{rank}").read_text())
    os.kill(pid, sig)


def _errors(log: str) -> str:
    """The lines of a torchrun log that say what failed (its tail is torchrun's report)."""
    return "\n".join(line for line in log.splitlines() if "rror" in line)[-3000:]


def _finish(procs: list, timeout: float = 400) -> list[subprocess.CompletedProcess]:
    done = []
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        out, err = (_read(f) for f in proc.logs)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _read(log) -> str:
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


def _start(command: list[str]) -> subprocess.Popen:
    """Start ``command`` with its output in files: two agents writing to pipes read one
    after the other could fill one and wait for each other."""
    logs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=logs[0], stderr=logs[1])
    proc.logs = logs
    return proc


@pytest.fixture(scope="module")
def uninterrupted_two(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run (standalone torchrun)."""
    tmp = tmp_path_factory.mktemp("two")
    command = _torchrun_args(tmp, tmp / "run", "--standalone", "--nproc-per-node=2")
    (result,) = _finish([_start(command)])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_with_last_pt(uninterrupted_two, tmp_path):
    run = tmp_path / "run"
    command = _torchrun_args(tmp_path, run, "--standalone", "--nproc-per-node=2")
    procs = [_start(command)]
    _kill_rank_mid_epoch(tmp_path, run, procs, rank=1, sig=signal.SIGTERM)
    (result,) = _finish(procs)
    assert result.returncode != 0
    assert "exitcode  : 75" in result.stderr or "exitcode: 75" in result.stderr, result.stderr
    assert "stopped by SIGTERM" in result.stderr
    state = load_checkpoint(run / "last.pt")
    positions = state.run["epoch_position"]
    assert positions is not None and len(positions) == 2
    (resumed,) = _finish([_start(command)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(run / "model.safetensors", uninterrupted_two / "model.safetensors")


@pytest.mark.slow
def test_sigterm_to_cait_train_nproc_stops_its_workers_with_last_pt(uninterrupted_two, tmp_path):
    """``cait train --nproc 2`` becomes torchrun (same pid), so a scheduler's SIGTERM to it
    reaches the workers: they write last.pt and exit 75, and --resume auto ends the run
    with the uninterrupted run's weights."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "cait", *_train_args(run), "--nproc", "2"]
    procs = [_start(command)]
    _wait_for_mid_epoch_checkpoint(run, procs[0])
    procs[0].send_signal(signal.SIGTERM)
    (result,) = _finish(procs)
    assert result.returncode != 0
    for rank in (0, 1):  # each worker's last line (torchrun reports its own SIGTERM)
        assert f"[rank {rank}] cait train: stopped by SIGTERM at step" in result.stderr
    assert len(load_checkpoint(run / "last.pt").run["epoch_position"]) == 2
    (resumed,) = _finish([_start(command)])
    assert resumed.returncode == 0, _errors(resumed.stderr)
    assert_same_weights(run / "model.safetensors", uninterrupted_two / "model.safetensors")


@pytest.mark.slow
def test_sigkill_of_a_worker_under_max_restarts_ends_with_the_same_weights(
    uninterrupted_two, tmp_path
):
    run = tmp_path / "run"
    command = _torchrun_args(
        tmp_path, run, "--standalone", "--nproc-per-node=2", "--max-restarts=1"
    )
    procs = [_start(command)]
    _kill_rank_mid_epoch(tmp_path, run, procs, rank=1, sig=signal.SIGKILL)
    (result,) = _finish(procs)
    assert result.returncode == 0, _errors(result.stderr)
    assert "resumed from" in result.stderr  # the restarted group continued from last.pt
    assert_same_weights(run / "model.safetensors", uninterrupted_two / "model.safetensors")


# One worker of a group that meets through a torchrun agent's store (TORCHELASTIC_*).
_GROUP_WORKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from cait.runtime import distributed
    Path(sys.argv[1]).write_text("joining")
    with distributed("cpu", 60):
        total = torch.ones(1)
        dist.all_reduce(total)
        print(int(total.item()))
    """
)


def test_a_restarted_worker_group_never_reads_its_predecessors_addresses(tmp_path):
    """torchrun keeps its agent's store across --max-restarts with the previous group's
    keys in it (pytorch/pytorch#135712): a restarted gloo group that read them connected
    to dead addresses and was refused. Two groups meet in turn through one agent store; in
    the second, rank 1 starts first, so it reads before rank 0 writes anything."""
    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port)}
    env |= {"WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    worker = tmp_path / "worker.py"
    worker.write_text(_GROUP_WORKER)
    for attempt in range(2):
        procs = []
        try:
            for rank in (1, 0):
                joining = tmp_path / f"joining{attempt}{rank}"
                command = [sys.executable, str(worker), str(joining)]
                rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                procs.append(subprocess.Popen(command, env=rank_env, stdout=subprocess.PIPE))
                deadline = time.monotonic() + 60
                while not joining.exists() and procs[-1].poll() is None:
                    assert time.monotonic() < deadline, "the worker did not start"
                    time.sleep(0.05)
                if rank == 1:
                    time.sleep(0.5)  # let rank 1 read the store before rank 0 joins
            deadline = time.monotonic() + 60
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() for p in procs):  # one failed: its peer would wait
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        outputs = [p.communicate()[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], f"attempt {attempt}"
        assert outputs == [b"2\n", b"2\n"]


def _two_agents(tmp_path: Path, run: Path, *extra: str) -> list[list[str]]:
    port = free_port()
    rendezvous = [
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=test{port}",
        *extra,
    ]
    return [_torchrun_args(tmp_path, run, *rendezvous) for _ in range(2)]


@pytest.mark.slow
def test_two_agents_on_one_host_match_the_standalone_run(uninterrupted_two, tmp_path):
    """Two "machines" (torchrun agents) of one process each, meeting on 127.0.0.1, train
    the same weights as the standalone 2-process run (which equals one process with the
    same global batch within 1e-5, test_distributed.py)."""
    together = tmp_path / "together"
    results = _finish([_start(c) for c in _two_agents(tmp_path, together)])
    for r in results:
        # torchrun: when the agent that serves the rendezvous store exits first, the other
        # agent's last call to the store can fail after its workers finished
        assert r.returncode == 0 or _store_gone_after_success(r.stderr), r.stderr[-3000:]
    assert_same_weights(together / "model.safetensors", uninterrupted_two / "model.safetensors")


@pytest.mark.slow
def test_sigkill_of_one_agents_worker_under_max_restarts_recovers_the_job(
    uninterrupted_two, tmp_path
):
    """Two agents with --max-restarts 1: the worker of global rank 1 (in either agent, as
    the rendezvous decides) is killed within an epoch; both agents restart their workers,
    which resume from last.pt and end with the weights of the uninterrupted run."""
    run = tmp_path / "run"
    procs = [_start(c) for c in _two_agents(tmp_path, run, "--max-restarts=1")]
    _kill_rank_mid_epoch(tmp_path, run, procs, rank=1, sig=signal.SIGKILL)
    results = _finish(procs)
    for r in results:
        assert r.returncode == 0 or _store_gone_after_success(r.stderr), _errors(r.stderr)
    assert any("resumed from" in r.stderr for r in results)
    assert_same_weights(run / "model.safetensors", uninterrupted_two / "model.safetensors")


def _store_gone_after_success(log: str) -> bool:
    finished = log.rfind("worker group successfully finished")
    return finished >= 0 and "RendezvousConnectionError" in log[finished:]
