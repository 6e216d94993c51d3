"""Nothing lost under faults: atomic checkpoints under SIGKILL, Ctrl-C and a full disk; run
folders that are never overwritten by mistake; one writer per folder; and the one-line
errors of ``cait train`` (docs/RELIABILITY.md)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights
from test_train import ROOT, digits_config  # tests/training is on the path (no __init__)

import cait.training.run
from cait.cli import main as cli_main
from cait.files import (
    FolderLock,
    atomic_write,
    error_line,
    remove_stale_temporaries,
    temporary_path,
)
from cait.models.registry import create_model, get_variant
from cait.models.weights_file import (
    WeightsFile,
    checkpoint_metadata,
    model_spec,
    read_weights_file,
)
from cait.training.checkpoint import RUN_FIELDS, RunCheckpoint, load_checkpoint, save_checkpoint
from cait.training.run import train
from cait.training.run_state import RunState

SRC = str(ROOT / "src")


def run_checkpoint(w: torch.Tensor, config: dict) -> RunCheckpoint:
    """A run checkpoint as these tests write it: one tensor ``w``, a digits model's metadata
    and a run state of ``config`` alone (what they check survives a fault)."""
    spec = model_spec("cait_digits_16", create_model("cait_digits_16"), {})
    meta = checkpoint_metadata(spec, get_variant("cait_digits_16").input_spec, list("0123456789"))
    return RunCheckpoint({"w": w}, meta, {"config": config})


def _read(path: Path) -> WeightsFile:
    """A checkpoint these tests wrote, read whole (the weights, the metadata checked) but its
    run state as it is: theirs holds a config alone, which resuming would refuse."""
    return read_weights_file(path)


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _temporary(name: str, pid: int) -> str:
    """The name of ``atomic_write``'s temporary file for ``name`` in process ``pid``."""
    mine = temporary_path(Path(name)).name
    return mine.replace(f"-{os.getpid()}.tmp", f"-{pid}.tmp")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished one-epoch run (with TensorBoard) to copy into each test."""
    root = tmp_path_factory.mktemp("finished")
    train(digits_config(root, "epochs=1", "tensorboard=true"))
    return root / "run"


def _copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


# --- checkpoints under faults -------------------------------------------------------------

# a process that writes a checkpoint, then writes another one slowly (made here: its own
# run_checkpoint, after the imports it needs)
_SLOW_SAVE_IMPORTS = """\
import sys, time, torch
from cait.models.registry import create_model, get_variant
from cait.models.weights_file import checkpoint_metadata, model_spec
from cait.training import checkpoint
from cait.training.checkpoint import RunCheckpoint
"""
_SLOW_SAVE = (
    _SLOW_SAVE_IMPORTS
    + inspect.getsource(run_checkpoint)
    + textwrap.dedent(
        """
    path, pause = sys.argv[1], float(sys.argv[2])
    checkpoint.save_checkpoint(run_checkpoint(torch.zeros(4), {"v": 1}), path)
    real_save = torch.save

    def slow_save(obj, f):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        with open(f, "wb") as out:  # the atomic writer hands torch.save a path
            out.write(data[: len(data) // 2])
            out.flush()
            print("HALF", flush=True)
            time.sleep(pause)
            out.write(data[len(data) // 2 :])

    torch.save = slow_save
    checkpoint.save_checkpoint(run_checkpoint(torch.ones(1000), {"v": 2}), path)
    print("SAVED", flush=True)
    """
    )
)


def _start_slow_save(path: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, str(path), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "HALF"
    return proc


def test_sigkill_mid_write_keeps_the_previous_checkpoint_and_the_next_writer_cleans_up(
    tmp_path,
):
    path = tmp_path / "last.pt"
    proc = _start_slow_save(path, pause=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    state = _read(path)
    assert state.run["config"] == {"v": 1} and torch.equal(state.weights()["w"], torch.zeros(4))
    # a process killed with SIGKILL cannot remove its temporary file, named after it...
    assert _temporaries(tmp_path) == [_temporary("last.pt", proc.pid)]
    # ...so the next writer of the folder removes it (a live writer's is kept)
    alive = tmp_path / _temporary("best.pt", os.getpid())
    alive.write_bytes(b"in progress")
    assert remove_stale_temporaries(tmp_path) == [tmp_path / _temporary("last.pt", proc.pid)]
    assert _temporaries(tmp_path) == [alive.name]


def test_ctrl_c_mid_write_finishes_the_write_then_stops(tmp_path):
    path = tmp_path / "last.pt"
    proc = _start_slow_save(path, pause=1.0)
    os.kill(proc.pid, signal.SIGINT)  # arrives halfway through the write
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert "SAVED" not in out  # it stopped right after the write...
    state = _read(path)  # ...which completed: the new checkpoint, whole
    assert state.run["config"] == {"v": 2} and torch.equal(state.weights()["w"], torch.ones(1000))
    assert _temporaries(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_temporary(small_disk):
    path = small_disk / "last.pt"
    save_checkpoint(run_checkpoint(torch.zeros(4), {"v": 1}), path)
    with pytest.raises(OSError) as failure:
        save_checkpoint(run_checkpoint(torch.ones(200_000), {"v": 2}), path)
    assert failure.value.errno == errno.ENOSPC and "No space left" in str(failure.value)
    assert _read(path).run["config"] == {"v": 1}
    assert _temporaries(small_disk) == []


def test_on_a_full_disk_a_writer_bug_is_still_reported_as_itself(small_disk):
    (small_disk / "filler").write_bytes(b"x" * (250 << 10))  # under 1 MiB left

    def buggy(path: Path) -> None:
        path.write_bytes(b"partial")
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        atomic_write(small_disk / "out.bin", buggy)
    assert _temporaries(small_disk) == []


def test_error_line_names_the_type_once():
    assert error_line(KeyError("x")) == "KeyError: 'x'"
    assert error_line(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert error_line(KeyError()) == "KeyError"  # not "KeyError: KeyError"


def test_a_full_disk_in_cait_train_is_one_line(small_disk, capsys):
    recipe = str(ROOT / "recipes" / "digits.yaml")
    args = ["--recipe", recipe, "--data", "digits", "--output", str(small_disk / "run")]
    sets = ["model_args.depth=2", "tensorboard=false"]
    code = cli_main(
        ["train", *args, "--epochs", "1", "--no-progress", *[f"--set={s}" for s in sets]]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("cait train: error: ") and "No space left on device" in err[-1]
    assert _temporaries(small_disk) == []


# --- run folders ----------------------------------------------------------------------


def test_a_second_run_into_a_folder_holding_one_is_refused_and_changes_nothing(
    finished_run, tmp_path, capsys
):
    run = _copy_run(finished_run, tmp_path)
    before = _tree(run)
    code = cli_main(
        ["train", "--recipe", str(ROOT / "recipes" / "digits.yaml"), "--data", "digits"]
        + ["--output", str(run), "--epochs", "1", "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "already holds a run" in err and "--overwrite" in err and "--resume auto" in err
    assert _tree(run) == before


def test_overwrite_keeps_the_old_run_until_the_new_first_checkpoint(
    finished_run, tmp_path, monkeypatch
):
    run = _copy_run(finished_run, tmp_path)
    (run / "wandb" / "offline-run-1").mkdir(parents=True)  # as W&B's offline mode leaves
    (run / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"old run")
    before = _tree(run)
    assert any(name.startswith("tensorboard/") for name in before)

    def fails_in_epoch_one(*args, **kwargs):
        raise RuntimeError("a failure in epoch 1")

    with monkeypatch.context() as m:
        m.setattr(cait.training.run, "train_one_epoch", fails_in_epoch_one)
        with pytest.raises(RuntimeError, match="epoch 1"):
            train(digits_config(tmp_path, "epochs=1", "overwrite=true", "tensorboard=true"))
    assert _tree(run) == before  # config.yaml, metrics, checkpoints, TensorBoard: as they were
    assert not (run / ".lock").exists()

    # a run that gets to its first checkpoint replaces the old run's files
    result = train(digits_config(tmp_path, "epochs=2", "overwrite=true", "stop_after=1"))
    assert not result.completed
    left = _tree(run)
    assert "model.safetensors" not in left  # the old run's weights went
    assert not any(name.startswith(("tensorboard/", "wandb/")) for name in left)  # its logs too
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert "epochs: 2" in (run / "config.yaml").read_text()
    assert load_checkpoint(run / "last.pt").run["config"]["epochs"] == 2


def test_a_failed_resume_changes_nothing(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    before = _tree(run)
    other = digits_config(tmp_path, f"resume={run / 'last.pt'}", "model_args.depth=3")
    with pytest.raises(ValueError, match="another model"):
        train(other)
    assert _tree(run) == before


def test_resume_auto_starts_fresh_continues_and_finishes(tmp_path):
    run = tmp_path / "run"
    first = train(digits_config(tmp_path, "epochs=2", "stop_after=1", "resume=auto"))
    assert [m["epoch"] for m in first.history] == [1] and not first.completed
    second = train(digits_config(tmp_path, "epochs=2", "resume=auto"))
    assert [m["epoch"] for m in second.history] == [1, 2] and second.completed
    finished = shutil.copy(run / "model.safetensors", tmp_path / "finished.safetensors")
    # a finished run: nothing left to train, the same weights written again
    third = train(digits_config(tmp_path, "epochs=2", "resume=auto"))
    assert [m["epoch"] for m in third.history] == [1, 2] and third.completed
    assert_same_weights(run / "model.safetensors", finished)


def test_resume_auto_refuses_a_run_without_last_pt(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights of an older run")
    with pytest.raises(ValueError, match="no last.pt to continue from"):
        train(digits_config(tmp_path, "resume=auto"))


def test_resume_auto_follows_a_linked_last_pt_and_replaces_the_link(finished_run, tmp_path):
    """A last.pt that links to another run's checkpoint is the run to continue (as
    resume=auto promises); the continued run's last.pt replaces the link, and the linked
    file stays as it was."""
    (tmp_path / "elsewhere").mkdir()
    elsewhere = _copy_run(finished_run, tmp_path / "elsewhere")
    before = _tree(elsewhere)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").symlink_to(elsewhere / "last.pt")
    result = train(digits_config(tmp_path, "epochs=2", "resume=auto"))
    assert [m["epoch"] for m in result.history] == [1, 2] and result.completed
    assert not (run / "last.pt").is_symlink() and load_checkpoint(run / "last.pt").run["epoch"] == 1
    assert _tree(elsewhere) == before


def test_one_writer_per_folder(tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, what="cait train"):
        with pytest.raises(ValueError, match=rf"in use by cait train \(pid {os.getpid()}"):
            train(digits_config(tmp_path, "epochs=1"))
    assert not (run / ".lock").exists()  # released on the way out


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = tmp_path / "run"
    run.mkdir()
    lock = {"pid": gone.pid, "host": os.uname().nodename, "started": "earlier"}
    (run / ".lock").write_text(json.dumps(lock))
    (run / _temporary("last.pt", gone.pid)).write_bytes(b"half a checkpoint")
    result = train(digits_config(tmp_path, "epochs=1"))
    assert result.completed
    assert "removing a stale lock" in caplog.text
    assert _temporaries(run) == [] and not (run / ".lock").exists()


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    output = tmp_path / "out"
    output.write_text("not a folder")
    code = cli_main(["train", "--data", "digits", "--output", str(output), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"cait train: error: output {output} is a file, not a folder"


def test_a_read_only_output_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        code = cli_main(["train", "--data", "digits", "--output", str(ro / "run")])
    finally:
        subprocess.run(["umount", "--lazy", str(ro)], check=False)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("cait train: error: ") and "Read-only file system" in err


# --- a run checkpoint from elsewhere (or edited by hand) -------------------------------

_GONE = object()  # a run field taken out of the checkpoint


def _ema_with(**extra) -> object:
    return lambda ema: {**ema, **extra}


def _without(name: str) -> object:
    return lambda ema: {k: v for k, v in ema.items() if k != name}


# (the run fields changed, what the one line names); a callable gets the field's value
_RUN_STATE_CASES = [
    ({"config": _GONE}, "no 'model'/'config' entries"),
    ({"config": 5}, "config must be a mapping"),
    ({"config": lambda c: {**c, "bogus": 1}}, "unknown config keys ['bogus']"),
    ({"config": lambda c: {**c, "epochs": "two"}}, "config: epochs must be an integer"),
    ({"epoch": _GONE}, "lacks ['epoch']"),
    ({"epoch": -5}, "epoch must be from -1 to 0, got -5"),
    ({"epoch": 10**12}, "epoch must be from -1 to 0, got 1000000000000"),
    ({"epoch": "1"}, "epoch must be an integer"),
    ({"step": -1000}, "step must be from 0 to"),
    ({"step": -1000, "schedule": lambda s: {**s, "step": -1000}}, "schedule.step must be from 0"),
    ({"step": 5}, "schedule.step 22 is not step 5"),
    ({"history": _GONE}, "lacks ['history']"),
    ({"history": "rows"}, "history must be a list"),
    ({"history": [1]}, "history[0] must be a mapping"),
    ({"history": [{"epoch": [1]}]}, "history[0] must map names to numbers"),
    ({"history": lambda h: h * 2}, "history has 2 rows for 1 epoch(s) done"),
    ({"best_top1": _GONE}, "lacks ['best_top1']"),
    ({"best_top1": "high"}, "best_top1 must be a number"),
    ({"best_top1": 1e9}, "best_top1 must be from -1.0 to 100.0"),
    ({"best_top1": float("nan")}, "best_top1 must be a finite number"),
    ({"schedule": _GONE}, "lacks ['schedule']"),
    ({"schedule": "x"}, "schedule must be a mapping"),
    ({"schedule": {"step": 11}}, "schedule lacks ['schedule.peak_lr'"),
    ({"schedule": lambda s: {**s, "steps_per_epoch": 0}}, "schedule.steps_per_epoch must be"),
    ({"rng": _GONE}, "lacks ['rng']"),
    ({"rng": lambda r: {**r, "numpy": {}}}, "rng is not an RNG state"),
    ({"rng": lambda r: {**r, "torch": torch.zeros(3)}}, "rng is not an RNG state"),
    ({"rng_ranks": [{"python": 1}]}, "rng_ranks[0] lacks ['numpy', 'torch']"),
    ({"optimizer": _GONE}, "lacks ['optimizer']"),
    ({"optimizer": {"state": {}}}, "optimizer must hold 'state' and 'param_groups'"),
    ({"ema": 5}, "ema must be a mapping"),
    ({"ema": _ema_with(extra=torch.zeros(1))}, "unexpected ['extra']"),
    ({"ema": _without("cls_token")}, "missing ['cls_token']"),
    ({"ema": _ema_with(cls_token=torch.zeros(2))}, "ema.cls_token has shape (2,)"),
    ({"ema": _ema_with(cls_token="weights")}, "ema must map names to tensors"),
    ({"bogus": 1}, "unknown run fields ['bogus']"),
]


def _crafted(finished_run: Path, tmp_path: Path, change: dict) -> Path:
    """The finished run's last.pt with ``change`` made to its run fields."""
    state = load_checkpoint(finished_run / "last.pt")
    run = dict(state.run)
    for name, value in change.items():
        if value is _GONE:
            del run[name]
        else:
            run[name] = value(run[name]) if callable(value) else value
    crafted = tmp_path / "crafted.pt"
    save_checkpoint(dataclasses.replace(state, run=run), crafted)
    return crafted


@pytest.mark.parametrize(("change", "message"), _RUN_STATE_CASES)
def test_a_malformed_run_state_is_refused_in_one_line(finished_run, tmp_path, change, message):
    """Each field of a last.pt from elsewhere is checked (type, range, the EMA against the
    model) before anything trains: one ValueError naming the file and the field."""
    crafted = _crafted(finished_run, tmp_path, change)
    with pytest.raises(ValueError) as refused:
        train(digits_config(tmp_path, "epochs=2", f"resume={crafted}"))
    text = str(refused.value)
    assert len(text.splitlines()) == 1 and str(crafted) in text and message in text, text
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": -1000}, "step must be from 0 to"),
        ({"epoch": 10**12}, "epoch must be from -1 to 0"),
        ({"history": _GONE}, "lacks ['history']"),
        ({"ema": _ema_with(extra=torch.zeros(1))}, "unexpected ['extra']"),
    ],
)
def test_a_malformed_run_state_is_one_line_in_cait_train(
    finished_run, tmp_path, capsys, change, message
):
    crafted = _crafted(finished_run, tmp_path, change)
    command = ["train", "--recipe", str(ROOT / "recipes" / "digits.yaml"), "--data", "digits"]
    command += ["--output", str(tmp_path / "run"), "--epochs", "2", "--resume", str(crafted)]
    command += ["--set", "model_args.depth=2", "--set", "tensorboard=false", "--no-progress"]
    code = cli_main(command)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("cait train: error: ") and message in err and str(crafted) in err


def test_the_run_state_schema_covers_every_run_field():
    assert {f.name for f in dataclasses.fields(RunState)} == set(RUN_FIELDS)


# --- Ctrl-C ---------------------------------------------------------------------------


def test_ctrl_c_exits_130_and_resume_auto_continues(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "cait", "train", "--recipe", "recipes/digits.yaml"]
    command += ["--data", "digits", "--output", str(run), "--epochs", "3", "--no-progress"]
    command += ["--set", "model_args.depth=2", "--set", "tensorboard=false"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "last.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("cait train: interrupted;") and "--resume auto" in last_line
    assert "Traceback" not in err
    assert not (run / ".lock").exists() and _temporaries(run) == []
    epochs_done = load_checkpoint(run / "last.pt").run["epoch"] + 1
    assert 1 <= epochs_done < 3
    resumed = subprocess.run(
        command + ["--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


# --- one-line errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "optim.lr=[1"], "invalid YAML"),
        (["--set", "augment.scale=[0.5]"], "augment.scale must have 2 items"),
        (["--recipe", "BROKEN"], "invalid YAML"),
        (["--init-from", "FOLDER"], "FOLDER"),
        (["--resume", "EMPTY_PT"], "EMPTY_PT"),
        (["--init-from", "http://127.0.0.1:9/w.pth"], "127.0.0.1:9"),
    ],
)
def test_bad_training_inputs_are_one_line(tmp_path, capsys, extra, message):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr: [1e-3\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    names = {"BROKEN": str(broken), "FOLDER": str(folder), "EMPTY_PT": str(empty)}
    extra = [names.get(a, a) for a in extra]
    message = names.get(message, message)
    code = cli_main(
        ["train", "--data", "digits", "--output", str(tmp_path / "run"), "--epochs", "1"] + extra
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("cait train: error: "), err
    assert message in err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("optim.clip_grad=.nan", "optim.clip_grad must be a finite number, got nan"),
        ("dist_timeout=.inf", "dist_timeout must be a finite number, got inf"),
        (
            "model_args.depths={a: &a [1,1,1,1,1,1,1,1,1], "
            + ", ".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            )
            + "}",
            "override model_args.depths holds more than 100,000 values after expanding YAML",
        ),
    ],
)
def test_a_setting_refused_leaves_no_folder(tmp_path, capsys, setting, message):
    """A number that is not finite, or an alias bomb, is one line before the output folder
    is made (each ends within seconds)."""
    run = tmp_path / "run"
    start = time.monotonic()
    code = cli_main(["train", "--data", "digits", "--output", str(run), "--set", setting])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("cait train: error: ")
    assert not run.exists() and time.monotonic() - start < 10


def test_verbose_shows_the_traceback(tmp_path, capsys):
    code = cli_main(["-v", "train", "--data", "digits", "--set", "optim.lr=[1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "invalid YAML" in err.strip().splitlines()[-1]


def test_atomic_write_temporaries_are_per_process(tmp_path):
    seen = []
    atomic_write(tmp_path / "f.txt", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")))
    assert seen == [_temporary("f.txt", os.getpid())]
    assert (tmp_path / "f.txt").read_text() == "x" and _temporaries(tmp_path) == []


def test_a_dead_exports_temporary_folder_is_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / _temporary("timm_folder", gone.pid)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / _temporary("other", os.getpid())
    mine.mkdir()
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and mine.exists()


def test_crafted_and_foreign_temporaries_are_left_alone(tmp_path):
    crafted = tmp_path / _temporary("last.pt", 10**20)  # no such process id
    other_host = tmp_path / ".last.pt.elsewhere-1.tmp"  # cannot be checked from here
    crafted.write_bytes(b"x")
    other_host.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [crafted]
    assert other_host.exists()


def test_a_lock_is_released_only_by_its_holder(tmp_path):
    lock = FolderLock(tmp_path)
    lock.acquire()
    other = {"pid": 1, "host": os.uname().nodename, "started": "now"}
    lock.path.write_text(json.dumps(other))  # taken over by someone else meanwhile
    lock.release()
    assert json.loads(lock.path.read_text()) == other
