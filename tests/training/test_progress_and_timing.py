"""Progress bars only on a terminal, log lines above them, and warm-up outside the timed
images/s of an epoch and of an evaluation (issue 21)."""

from __future__ import annotations

import io
import logging
import time

import torch
from torch import nn

from cait import progress
from cait.runtime import get_rng_state
from cait.training.engine import EpochPosition, evaluate, train_one_epoch

WARM_UP_S = 0.4  # the first forward pass's stand-in for a kernel build


class _SlowFirstCall(nn.Module):
    """A linear classifier whose first forward pass sleeps, as a first kernel load does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            time.sleep(WARM_UP_S)
        return self.fc(x)


class _Opt:
    """The parts of ``Optimisation`` an epoch uses: plain SGD, constant learning rate."""

    accum_steps = 1

    def __init__(self, model: nn.Module) -> None:
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def schedule(self, step: int) -> float:
        return 0.1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model: nn.Module, step: int) -> float:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return 0.1


def _batches(count: int = 4, size: int = 8) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 4, generator=g), torch.arange(size) % 3, []) for _ in range(count)]


def _epoch(on_log=None, log_interval: int = 1, position: EpochPosition | None = None):
    model = _SlowFirstCall()
    return train_one_epoch(
        model, _batches(), _Opt(model), 0, 0, torch.device("cpu"), progress=True,
        log_interval=log_interval, on_log=on_log, position=position,
    )[0]  # fmt: skip


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    _epoch()
    evaluate(_SlowFirstCall(), _batches(), torch.device("cpu"), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, repr(err)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_log_lines_are_written_whole_above_the_bar(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    handler = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        _epoch(
            on_log=lambda step, loss, lr: logging.getLogger("cait.test").warning("LOGGED %d", step)
        )
    finally:
        root.removeHandler(handler)
    text = terminal.getvalue()
    assert "\r" in text  # a bar was drawn
    lines = text.replace("\r", "\n").splitlines()
    logged = [line for line in lines if "LOGGED" in line]
    assert logged == [f"LOGGED {step}" for step in range(1, 5)], lines
    assert progress.on_terminal()


def test_epoch_images_per_s_leaves_out_the_warm_up_step():
    stats = _epoch()
    assert stats.seconds >= WARM_UP_S  # the epoch's duration still counts it
    # with the warm-up in it the rate would be at most 32 / 0.4 = 80 images/s
    assert stats.images_per_s > 300, stats
    assert stats.timed_images == 24


def test_a_resumed_epoch_times_the_steps_after_this_process_warm_up():
    """An epoch continued after 2 of its 4 steps: the warm-up is this process's first step
    (the third), not the epoch's first, and the earlier process's time stays out."""
    earlier = EpochPosition(2, 2, 0.0, 16, 5.0, (), get_rng_state())
    stats = _epoch(position=earlier)
    assert stats.images == 32 and stats.seconds >= 5.0 + WARM_UP_S
    assert stats.timed_images == 8, stats  # the fourth step's
    assert stats.images_per_s > 300, stats  # 32 images over 5.4 s and more without it


def test_eval_images_per_s_leaves_out_the_first_batch():
    result = evaluate(_SlowFirstCall(), _batches(), torch.device("cpu"))
    assert result["images"] == 32
    assert result["images_per_s"] > 300, result  # at most 80 with the warm-up
