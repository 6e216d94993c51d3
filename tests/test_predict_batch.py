"""`cait predict` over folders into a results file (cait.inference.batch, .results): every
image once, in each format, the same answers as one image at a time, a stopped run resumed
(a torn journal line, a process killed with SIGKILL), refusals in one line; and `cait eval`
over several checkpoints and precisions into a results file."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from test_inference import tiny_checkpoint

from cait.cli import main
from cait.data import DigitsDataset
from cait.inference import evaluate_checkpoint, predict, predict_to_file, read_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    return tiny_checkpoint(folder, "cait_digits_16", list("0123456789"), seed=2)


def digit_folder(root: Path, count: int, nested: bool = True, size: int = 8) -> list[Path]:
    """``count`` digit images as ``size``-pixel PNGs, half in a sub-folder; their paths,
    sorted."""
    data = DigitsDataset("val")
    paths = []
    for i in range(count):
        folder = root / "sub" if nested and i % 2 else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"d{i:04d}.png"
        data[i][0].resize((size, size)).save(path)
        paths.append(path)
    return sorted(paths, key=lambda p: str(p).split(os.sep))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    digit_folder(root, 24)
    return root


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_image_is_one_row_with_the_answers_of_one_at_a_time(
    checkpoint, images, tmp_path, suffix
):
    output = tmp_path / f"results{suffix}"
    summary = predict_to_file(str(checkpoint), [images], output, topk=3, batch_size=5)
    rows = read_rows(output)
    files = sorted(images.rglob("*.png"), key=lambda p: str(p).split(os.sep))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert summary["rows"] == summary["images"] == 24
    assert list(rows[0]) == ["path", "top1", "prob1", "top2", "prob2", "top3", "prob3"]
    singly = predict(str(checkpoint), [str(f) for f in files[:6]], topk=3)
    for row, one in zip(rows, singly, strict=False):
        assert row["top1"] == one["predictions"][0]["name"]
        assert abs(float(row["prob1"]) - one["predictions"][0]["probability"]) < 1e-5
    assert not list(tmp_path.glob(".*")), "no journal, lock or temporary file is left"


def test_an_existing_output_or_journal_is_refused_in_one_line(checkpoint, images, tmp_path, capsys):
    output = tmp_path / "r.csv"
    args = ["predict", "--checkpoint", str(checkpoint), str(images), "--output", str(output)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "exists: --force replaces it" in err and "\n" not in err
    assert main([*args, "--force"]) == 0
    journal = tmp_path / ".r.csv.partial.jsonl"
    journal.write_text("")
    output.unlink()
    capsys.readouterr()
    assert main(args) == 2
    assert "--resume continues it" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), str(images), "--resume"]) == 2
    assert "give --output" in capsys.readouterr().err


def test_resume_keeps_the_journal_rows_drops_a_torn_one_and_runs_the_rest(
    checkpoint, images, tmp_path
):
    full = tmp_path / "full.jsonl"
    predict_to_file(str(checkpoint), [images], full, batch_size=4)
    rows = read_rows(full)
    output = tmp_path / "r.jsonl"
    journal = tmp_path / ".r.jsonl.partial.jsonl"
    kept = rows[:10]
    # rows the stopped run wrote (marked, to see they are kept, not recomputed) and a torn
    # line: the write a SIGKILL cut short
    marked = [{**r, "prob1": -1.0} for r in kept]
    text = "".join(json.dumps(r) + "\n" for r in marked) + json.dumps(rows[10])[:25]
    journal.write_text(text)
    summary = predict_to_file(str(checkpoint), [images], output, batch_size=4, resume=True)
    assert summary["images"] == len(rows) - 10  # the torn row is run again
    resumed = read_rows(output)
    assert [r["path"] for r in resumed] == [r["path"] for r in rows]
    assert [r["prob1"] for r in resumed[:10]] == [-1.0] * 10
    # the same answers (other batches: the last digit of a probability may differ)
    for got, want in zip(resumed[10:], rows[10:], strict=True):
        assert got["top1"] == want["top1"] and abs(got["prob1"] - want["prob1"]) < 1e-5
    assert not journal.exists()


def test_unreadable_files_in_a_folder_are_skipped_and_reported(checkpoint, tmp_path, capsys):
    folder = tmp_path / "mixed"
    digit_folder(folder, 3, nested=False)
    (folder / "broken.png").write_text("not an image")
    Image.new("RGB", (2, 2)).save(folder / "tiny.png")  # smaller than one 4x4 patch
    output = tmp_path / "r.csv"
    assert (
        main(["predict", "--checkpoint", str(checkpoint), str(folder), "--output", str(output)])
        == 0
    )
    out = capsys.readouterr().out
    assert "3 rows in" in out and "skipped 2 unreadable file(s)" in out
    with open(output) as f:
        assert len(list(csv.DictReader(f))) == 3


def test_a_folder_without_output_prints_each_image(checkpoint, images, capsys):
    assert (
        main(["predict", "--checkpoint", str(checkpoint), str(images), "--json", "--topk", "1"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 24
    assert set(json.loads(lines[0])) == {"path", "top1", "prob1"}


def _journal_rows(journal: Path) -> int:
    try:
        return journal.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_a_run_killed_with_sigkill_resumes_with_every_row_once(tmp_path):
    """A real process killed mid-run (SIGKILL: nothing runs on the way out), then --resume:
    the output has every image once, the answers of an uninterrupted run."""
    folder = tmp_path / "images"
    files = digit_folder(folder, 160, size=32)  # no smaller than one 16-pixel patch
    # a 224-pixel model, one image a batch: slow enough to be caught mid-way
    ckpt = tiny_checkpoint(tmp_path, "cait_xxs24_224", [str(i) for i in range(1000)], seed=3)
    output = tmp_path / "r.csv"
    journal = tmp_path / ".r.csv.partial.jsonl"
    args = [sys.executable, "-m", "cait", "predict", "--checkpoint", str(ckpt), str(folder)]
    args += ["--output", str(output), "--batch-size", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_rows(journal) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    written = _journal_rows(journal)
    assert 5 <= written < len(files), f"the run was not caught mid-way: {err.decode()[-2000:]}"
    assert not output.exists()
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(output)
    assert [r["path"] for r in rows] == [str(f) for f in files]
    fresh = tmp_path / "fresh.csv"
    predict_to_file(str(ckpt), [folder], fresh, batch_size=16)
    assert [r["top1"] for r in rows] == [r["top1"] for r in read_rows(fresh)]


def test_eval_several_checkpoints_and_precisions_into_a_results_file(checkpoint, tmp_path, capsys):
    other = tiny_checkpoint(tmp_path, "cait_digits_16", list("0123456789"), seed=5)
    results = tmp_path / "eval.csv"
    args = ["eval", "--checkpoint", str(checkpoint), str(other), "--data", "digits"]
    args += ["--precision", "fp32", "int8", "--results-file", str(results), "--batch-size", "180"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = read_rows(results)
    assert [(r["checkpoint"], r["precision"]) for r in rows] == [
        (str(checkpoint), "fp32"),
        (str(checkpoint), "int8"),
        (str(other), "fp32"),
        (str(other), "int8"),
    ]
    assert {"top1", "top5", "loss", "images_per_s"} <= set(rows[0])
    assert all(r["images"] == "360" for r in rows)
    assert out.count("top-1") == 4 and "4 rows in" in out
    assert (
        main(
            ["eval", "--checkpoint", str(checkpoint), "--data", "digits", "--results-file", "r.txt"]
        )
        == 2
    )
    assert "a results file ends in .csv, .jsonl, .parquet" in capsys.readouterr().err


def test_a_data_source_is_predicted_with_its_labels_and_agrees_with_eval(checkpoint, tmp_path):
    """--data digits: one row per image of the split cait eval reads, its label beside the
    prediction; the rows' top-1 accuracy is eval's."""
    output = tmp_path / "digits.csv"
    summary = predict_to_file(str(checkpoint), data="digits", output=output, batch_size=100)
    rows = read_rows(output)
    assert summary["rows"] == len(rows) == 360
    assert len({r["path"] for r in rows}) == 360 and rows[0]["path"].startswith("digits[val]")
    hits = sum(r["top1"] == r["label"] for r in rows)
    assert 100 * hits / 360 == pytest.approx(evaluate_checkpoint(str(checkpoint), "digits")["top1"])
    # resumed from a journal of its first 100 rows: only the other 260 are run
    journal = tmp_path / ".again.csv.partial.jsonl"
    journal.write_text(
        "".join(json.dumps(r) + "\n" for r in read_rows(tmp_path / "digits.csv")[:100])
    )
    again = predict_to_file(
        str(checkpoint), data="digits", output=tmp_path / "again.csv", resume=True
    )
    assert again["images"] == 260 and again["rows"] == 360
    with pytest.raises(ValueError, match="one of the two"):
        predict_to_file(str(checkpoint), [tmp_path], data="digits")
