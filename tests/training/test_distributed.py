"""Distributed training under torchrun on 2 CPU processes (gloo): sharding, equivalence with
one process, exact resume, FSDP checkpoints that load in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from cait.data import (
    RepeatedAugSampler,
    ShardSampler,
    ShuffleSampler,
    collate_samples,
)
from cait.data.samplers import _epoch_generator
from cait.models.build import load_for_inference
from cait.training.checkpoint import load_checkpoint
from cait.training.config import apply_overrides, config_from_dict, load_recipe
from cait.training.engine import evaluate
from cait.training.records import TIMING_KEYS
from cait.training.run import train

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
# Deterministic training on the digits: no random augmentation, no mixup, no drop-path or
# dropout, so that 2 processes and 1 process compute the same thing up to float rounding.
DETERMINISTIC = (
    "augment.scale=[1.0,1.0]",
    "augment.ratio=[1.0,1.0]",
    "augment.color_jitter=0.0",
    "ema=false",
)
TOLERANCE = 1e-5


def _config(tmp_path: Path, *overrides: str):
    """The digits recipe shrunk to seconds: a 1-block model, 2 epochs, one thread per process
    (as torchrun sets it; results are compared across runs, cait.threads)."""
    base = load_recipe(ROOT / "recipes" / "digits.yaml")
    defaults = [
        f"output={tmp_path}",
        "model_args.depth=1",
        "epochs=2",
        "progress=false",
        "tensorboard=false",
        "threads=1",
    ]
    return config_from_dict(apply_overrides(base, defaults + list(overrides)))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={WORLD}", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _max_weight_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference between two state dicts, and where it is."""
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)


# ------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("repeats", [1, 3])
def test_train_samplers_shard_without_overlap(world, repeats):
    size, seed = 50, 4

    def shards(epoch):
        out = []
        for rank in range(world):
            if repeats == 1:
                s = ShuffleSampler(size, seed, num_replicas=world, rank=rank)
            else:
                s = RepeatedAugSampler(size, repeats, seed, num_replicas=world, rank=rank)
            s.set_epoch(epoch)
            out.append(list(s))
        return out

    first, second = shards(0), shards(1)
    # every rank has the epoch length of plain shuffling, size // world
    assert all(len(s) == size // world for s in first)
    assert first != second  # the order changes with the epoch
    assert shards(0) == first  # and depends on (seed, epoch) only
    if repeats == 1:
        flat = [i for s in first for i in s]
        assert len(set(flat)) == len(flat)  # no image on two ranks
    else:
        # the ranks deal out positions of one repeated order [i, i, i, j, j, j, ...]: none
        # is dealt twice, so each image has at most `repeats` copies over all ranks
        order = torch.randperm(size, generator=_epoch_generator(seed, 0))
        repeated = order.repeat_interleave(repeats).tolist()
        for rank, s in enumerate(first):
            assert s == repeated[rank::world][: size // world]


def test_global_batches_of_the_shards_are_those_of_one_process():
    size, seed, per_rank = 37, 1, 4
    one = list(ShuffleSampler(size, seed))
    ranks = [list(ShuffleSampler(size, seed, WORLD, r)) for r in range(WORLD)]
    for step in range(len(ranks[0]) // per_rank):
        union = sorted(i for r in ranks for i in r[step * per_rank : (step + 1) * per_rank])
        glob = WORLD * per_rank
        assert union == sorted(one[step * glob : (step + 1) * glob])


def test_shard_sampler_covers_every_index_once():
    for size in (0, 1, 7, 10):
        shards = [list(ShardSampler(size, 3, r)) for r in range(3)]
        assert sorted(i for s in shards for i in s) == list(range(size))
        assert [len(ShardSampler(size, 3, r)) for r in range(3)] == [len(s) for s in shards]


# ---------------------------------------------------------------------------- evaluation


class _Points(Dataset):
    """Random 16x16 images with random labels: about chance-level accuracy for a tiny
    untrained model, so that the hit counts are neither 0 nor all."""

    def __init__(self, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 3, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), ()


def _tiny_model():
    from cait.models.registry import create_model

    torch.manual_seed(0)
    return create_model("cait_digits_16", depth=1, num_classes=3).eval()


def _evaluate_rank(rank: int, init_file: str, size: int, results: str) -> None:
    from cait.runtime import DistInfo
    from cait.training.parallel import wrap_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ds = _Points(size)
        loader = DataLoader(
            ds, batch_size=4, sampler=ShardSampler(size, WORLD, rank), collate_fn=collate_samples
        )
        cpu = torch.device("cpu")
        plain = evaluate(_tiny_model(), loader, cpu)
        # FSDP gathers weights in every forward: the rank with fewer batches must keep step
        sharded = wrap_model(_tiny_model(), "fsdp", DistInfo(rank, WORLD, rank), cpu)
        fsdp = evaluate(sharded, loader, cpu)
        if rank == 0:
            torch.save({"plain": plain, "fsdp": fsdp}, results)
        # tearing gloo down while the peer is still working aborts the process now and then
        # ("terminate called without an active exception"): leave together
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # gloo's threads can still abort this process in the C++ destructors run at exit (seen
    # about once in three runs of tests/training/ on 2 busy cores): the results are saved,
    # so leave without running them
    os._exit(0)


def test_distributed_evaluation_counts_every_image_once(tmp_path):
    """17 images on 2 ranks in batches of 4: rank 0 has 9 (3 batches), rank 1 has 8 (2)."""
    size = 17
    loader = DataLoader(_Points(size), batch_size=4, collate_fn=collate_samples)
    one = evaluate(_tiny_model(), loader, torch.device("cpu"))
    results = tmp_path / "results.pt"
    mp.spawn(
        _evaluate_rank, args=(str(tmp_path / "init"), size, str(results)), nprocs=WORLD, join=True
    )
    both = torch.load(results, weights_only=False)
    assert one["images"] == size and 0 < one["top1"] < 100
    for how in ("plain", "fsdp"):
        got = both[how]
        assert got["images"] == size, how
        assert got["top1"] == one["top1"] and got["top5"] == one["top5"], how
        assert got["loss"] == pytest.approx(one["loss"], abs=1e-6), how


# ----------------------------------------------------------------------------- training


# The equivalence runs: clipping on, so that it is checked on the all-reduced gradient.
EQUIVALENCE = [*DETERMINISTIC, "optim.clip_grad=1.0"]


def _train_two(output: Path, *extra: str) -> str:
    """``torchrun -m cait train`` on 2 processes x batch 64, the equivalence settings."""
    sets = ["model_args.depth=1", "tensorboard=false", "threads=1", *EQUIVALENCE]
    args = ["--recipe", str(ROOT / "recipes" / "digits.yaml"), "--output", str(output)]
    args += ["--no-progress", "--data", "digits", "--epochs", "2", "--batch-size", "64"]
    proc = _torchrun("-m", "cait", "train", *args, *extra, *[a for s in sets for a in ("--set", s)])
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-process run, and the 1-process run with the same global batch (128), stopped
    after epoch 1 (its checkpoint kept) and resumed."""
    tmp = tmp_path_factory.mktemp("equivalence")
    log = _train_two(tmp / "two")
    one = tmp / "one"
    train(_config(one, "data.batch_size=128", "stop_after=1", *EQUIVALENCE))
    shutil.copy(one / "last.pt", tmp / "one_epoch1.pt")
    # resumed from a copy kept outside the run folder, into the folder (it holds the run)
    copy = f"resume={tmp / 'one_epoch1.pt'}"
    train(_config(one, "data.batch_size=128", copy, "overwrite=true", *EQUIVALENCE))
    runs = {"two": tmp / "two", "one": one, "one_epoch1": tmp / "one_epoch1.pt", "tmp": tmp}
    return {**runs, "log": log}


def test_two_processes_match_one_process_with_the_same_global_batch(equivalence_runs):
    """Same losses, learning rates and final weights within 1e-5. The largest weight
    difference is in the class-attention key biases: their exact gradient is zero (softmax
    does not change when every logit moves by q.b), so AdamW turns rounding noise there
    into steps."""
    two, one = equivalence_runs["two"], equivalence_runs["one"]
    rows_two, rows_one = _metrics(two), _metrics(one)
    assert [r["epoch"] for r in rows_two] == [1, 2]  # one writer only
    assert "[rank 0] INFO cait.training.run: epoch 2/2" in equivalence_runs["log"]
    assert "[rank 1] INFO" not in equivalence_runs["log"]  # rank 1 logs warnings only
    for a, b in zip(rows_two, rows_one, strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE, rel=0), key
        assert a["val_images"] == b["val_images"] == 360
    diff = _max_weight_difference(
        load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    )
    assert diff[0] < TOLERANCE, diff


def test_a_single_process_checkpoint_resumes_on_two_processes(equivalence_runs):
    resumed = equivalence_runs["tmp"] / "resumed"
    _train_two(resumed, "--resume", str(equivalence_runs["one_epoch1"]))
    assert [r["epoch"] for r in _metrics(resumed)] == [1, 2]
    diff = _max_weight_difference(
        load_file(resumed / "model.safetensors"),
        load_file(equivalence_runs["two"] / "model.safetensors"),
    )
    assert diff[0] < TOLERANCE, diff


_RESUME_SCRIPT = textwrap.dedent(
    """
    # Under torchrun: an uninterrupted 2-epoch run, and the same run stopped after epoch 1
    # and resumed from its checkpoint. Random crops, colour jitter, repeated augmentation
    # and drop-path are on: each rank's RNG streams must resume.
    import sys
    import torch.distributed as dist
    from cait.training.run import train
    from cait.training.config import apply_overrides, config_from_dict, load_recipe

    root, out = sys.argv[1], sys.argv[2]
    base = load_recipe(root + "/recipes/digits.yaml")
    common = ["model_args.depth=1", "epochs=2", "progress=false", "tensorboard=false",
              "data.batch_size=128", "augment.repeated_aug=3", "model_args.drop_path_rate=0.1",
              "threads=1"]  # pinned: the runs are compared bit for bit (cait.threads)

    def run(*extra):
        return train(config_from_dict(apply_overrides(base, common + list(extra))))

    dist.init_process_group("gloo")
    run(f"output={out}/full")
    run(f"output={out}/split", "stop_after=1")
    run(f"output={out}/split", f"resume={out}/split/last.pt")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_distributed_resume_is_exact(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT)
    _torchrun(str(script), str(ROOT), str(tmp_path))
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    assert full.run["epoch"] == split.run["epoch"] == 1
    assert len(split.run["rng_ranks"]) == WORLD
    for key in full.weights:
        assert torch.equal(full.weights[key], split.weights[key]), key
    for key in full.run["ema"]:
        assert torch.equal(full.run["ema"][key], split.run["ema"][key]), key
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "split")


_FSDP_SCRIPT = textwrap.dedent(
    """
    # Under torchrun: FSDP (fully_shard) with gradient checkpointing, stopped after epoch 1
    # and resumed (the sharded optimiser state goes through the plain checkpoint); rank 0
    # then saves the sharded model's logits on a fixed batch.
    import sys
    import torch
    import torch.distributed as dist
    from cait.training.run import train
    from cait.training.config import apply_overrides, config_from_dict, load_recipe

    root, out = sys.argv[1], sys.argv[2]
    base = load_recipe(root + "/recipes/digits.yaml")
    common = ["model_args.depth=2", "epochs=2", "progress=false", "tensorboard=false",
              "data.batch_size=128", "parallel=fsdp", "ema=false", "grad_checkpointing=true",
              f"output={out}/run", "threads=1"]

    def run(*extra):
        return train(config_from_dict(apply_overrides(base, common + list(extra))))

    dist.init_process_group("gloo")
    run("stop_after=1")
    result = run(f"resume={out}/run/last.pt")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result.model.eval()
    with torch.no_grad():
        logits = result.model(x)  # a collective: every rank gathers the blocks' weights
    if dist.get_rank() == 0:
        torch.save({"x": x, "logits": logits}, out + "/logits.pt")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_fsdp_run_checkpoints_and_reloads_in_one_process(tmp_path):
    script = tmp_path / "fsdp.py"
    script.write_text(_FSDP_SCRIPT)
    _torchrun(str(script), str(ROOT), str(tmp_path))
    saved = torch.load(tmp_path / "logits.pt", weights_only=True)
    for name in ("model.safetensors", "last.pt"):
        loaded = load_for_inference(str(tmp_path / "run" / name))
        with torch.no_grad():
            logits = loaded.model(saved["x"])
        torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    optimizer = state.run["optimizer"]
    assert state.run["epoch"] == 1 and isinstance(next(iter(optimizer["state"])), int)
    rows = _metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_images"] == 360


_FAILURE_SCRIPT = textwrap.dedent(
    """
    # Under torchrun: `cait train` where rank 1 alone meets a NaN loss (mode "nan") or an
    # error of its own (mode "error") at its 3rd batch.
    import os
    import sys
    import cait.training.losses
    from cait.cli import main

    mode, args = sys.argv[1], sys.argv[2:]
    real = cait.training.losses.DistillationLoss.__call__
    calls = {"n": 0}

    def poisoned(self, outputs, target, teacher_logits=None):
        calls["n"] += 1
        out = real(self, outputs, target, teacher_logits)
        if os.environ["RANK"] == "1" and calls["n"] >= 3:
            if mode == "error":
                raise RuntimeError("rank 1 broke down")
            out.loss = out.loss * float("nan")
        return out

    cait.training.losses.DistillationLoss.__call__ = poisoned
    sys.exit(main(args))
    """
)


@pytest.mark.parametrize("mode", ["nan", "error"])
def test_a_failure_on_one_rank_ends_the_job_with_the_error(tmp_path, mode):
    """A NaN on rank 1 stops both ranks (the check is all-reduced); an exception on rank 1
    ends the job through torchrun, with the error in the output, not a hang."""
    script = tmp_path / "fail.py"
    script.write_text(_FAILURE_SCRIPT)
    args = ["train", "--recipe", str(ROOT / "recipes" / "digits.yaml"), "--output", str(tmp_path)]
    args += ["--epochs", "1", "--batch-size", "64", "--no-progress"]
    args += ["--set", "model_args.depth=1", "--set", "log_interval=1", "--set", "tensorboard=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={WORLD}", str(script), mode, *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    if mode == "nan":
        for rank in range(WORLD):
            assert f"[rank {rank}] cait train: error: training loss became nan" in output
    else:
        assert "RuntimeError: rank 1 broke down" in output
    assert not (tmp_path / "last.pt").exists()


class _Replaced(Exception):
    """The process was replaced (os.execv, patched)."""


@pytest.mark.parametrize("nproc", [["--nproc", "3"], ["--nproc=3"]])
def test_cli_nproc_relaunches_itself_under_torchrun(tmp_path, monkeypatch, nproc):
    import cait.cli

    calls = []

    def execv(path, command):
        calls.append((path, command))
        raise _Replaced

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cait.cli.os, "execv", execv)
    args = ["train", "--data", "digits", "--output", str(tmp_path), "--epochs", "1"]
    with pytest.raises(_Replaced):
        cait.cli.main([*args[:3], *nproc, *args[3:]])
    ((path, cmd),) = calls
    assert path == cmd[0] == sys.executable
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"] + [
        "-m",
        "cait",
        *args,
    ]
    assert not (tmp_path / "config.yaml").exists()  # the launcher itself trains nothing
