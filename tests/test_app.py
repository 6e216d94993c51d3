"""`cait app`: the analysis behind the page, its bad-input handling, its HTTP API, and the
page itself in a real browser (headless Debian chromium driven by Playwright).

One app server serves two tiny checkpoints made here (a digits model and a "photo" model)
for the whole module; one browser page per browser test.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image
from test_inference import png_claiming, tiny_checkpoint

from cait import app as app_module
from cait.analysis.explain import METHODS
from cait.analysis.explore import VIEW_PX, explanation_view, patch_at, self_attention_view
from cait.analysis.residuals import residual_ratios
from cait.app import (
    DIGIT_EXAMPLES,
    NOT_UPLOADED,
    PHOTO_EXAMPLES,
    analyse,
    build_app,
    check_image,
    load_app_models,
    retrace,
    serve,
    uploaded_file,
)
from cait.cli import build_parser, main
from cait.data import DigitsDataset, eval_transform

DIGITS = "cait_digits_16"  # 16x16 input, patch 4: a 4x4 grid
PHOTOS = "cait_tiny_32"  # 32x32 input, patch 4: an 8x8 grid
PHOTO_CLASSES = ["cat", "cup", "dog", "car", "tree", "boat", "bird", "fish", "lamp", "shoe"]
CHROMIUM = shutil.which("chromium")

pytestmark = [
    # Gradio's queue sets pandas options that pandas 3 deprecates (Gradio's, not ours)
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
    # the "huge" image: PIL warns as it opens the header, then the app refuses it
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("app_checkpoints")
    return (
        tiny_checkpoint(folder, DIGITS, list(DigitsDataset.classes), seed=1),
        tiny_checkpoint(folder, PHOTOS, PHOTO_CLASSES, seed=2),
    )


@pytest.fixture(scope="module")
def models(checkpoints):
    return load_app_models([str(c) for c in checkpoints])


def _predicted_by_cli(checkpoint: Path, image: Path, capsys) -> str:
    """The top-1 name that `cait predict` prints for an image."""
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--json"]) == 0
    return json.loads(capsys.readouterr().out)[0]["predictions"][0]["name"]


# ---------------------------------------------------------------------------- the analysis


def test_the_analysis_is_the_models_prediction_and_traces(models, checkpoints, capsys):
    digits = models[0]
    image = DIGIT_EXAMPLES[0]
    analysis = analyse(digits, check_image(image, 4))
    assert analysis.predictions[0]["name"] == _predicted_by_cli(checkpoints[0], image, capsys)
    probs = [p["probability"] for p in analysis.predictions]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1

    ca = analysis.maps.class_attention  # (L, H, T, T + N)
    assert ca.shape == (2, 2, 1, 17)
    np.testing.assert_allclose(ca.sum(-1), 1.0, atol=1e-5)
    assert analysis.maps.grid == (4, 4) and analysis.sa_block == 1  # the last SA block

    # the residual ratios of this image are those the residuals report measures
    x = eval_transform(digits.loaded.settings)(check_image(image, 4))
    report = residual_ratios(digits.model, [(x[None],)], progress=False)
    assert analysis.residuals.stages == ["sa", "sa", "ca", "ca"]
    np.testing.assert_allclose(analysis.residuals.attn, report.attn, rtol=1e-5)
    np.testing.assert_allclose(analysis.residuals.mlp, report.mlp, rtol=1e-5)

    answer = analysis.to_dict()
    assert np.asarray(answer["class_attention"]).shape == (2, 2, 4, 4)
    json.dumps(answer)  # plain JSON


def test_the_self_attention_view_shows_the_clicked_patchs_row(models):
    analysis = analyse(models[0], check_image(DIGIT_EXAMPLES[0], 4), sa_block=0)
    sa = analysis.maps.self_attention  # (H, N, N), block 0
    for patch in (0, 5, 15):
        np.testing.assert_array_equal(
            analysis.maps.patch_attention(patch), sa[:, patch, :].reshape(2, 4, 4)
        )
    with pytest.raises(ValueError, match=r"patch must be in \[0, 15\]"):
        analysis.maps.patch_attention(16)

    # a click lands on the patch under it (4x4 grid over VIEW_PX pixels)
    cell = VIEW_PX / 4
    assert patch_at(analysis, 1, 1) == 0
    assert patch_at(analysis, VIEW_PX - 1, VIEW_PX - 1) == 15
    assert patch_at(analysis, 2.5 * cell, 1.5 * cell) == 6

    # the map itself changes with the query patch and the head: compare the bottom-left
    # patch, which neither query outlines (the centre patch 10, or patch 0)
    def bottom_left(picture) -> np.ndarray:
        return np.asarray(picture)[round(3.2 * cell) : round(3.8 * cell), : round(0.8 * cell)]

    centre = bottom_left(self_attention_view(analysis, head=None))
    corner = dataclasses.replace(analysis, query=0)
    assert analysis.query == 10
    assert not np.array_equal(centre, bottom_left(self_attention_view(corner, head=None)))
    assert not np.array_equal(centre, bottom_left(self_attention_view(analysis, head=1)))

    deeper = retrace(models[0], analysis, 1)
    assert deeper.sa_block == 1 and not np.allclose(deeper.maps.self_attention, sa)
    np.testing.assert_array_equal(deeper.maps.class_attention, analysis.maps.class_attention)
    with pytest.raises(ValueError, match=r"sa_block must be in \[0, 1\], got 2"):
        retrace(models[0], analysis, 2)  # depth 2


# --------------------------------------------------------------------------- bad input


def _bad_file(kind: str, folder: Path) -> Path:
    if kind == "text":
        path = folder / "notes.txt"
        path.write_text("not an image\n")
    elif kind == "empty":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif kind == "truncated":
        path = folder / "cut.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "bomb":  # over twice PIL's limit: PIL refuses it
        path = png_claiming(folder / "bomb.png", 30_000, 30_000)
    elif kind == "huge":  # over PIL's limit, where PIL only warns: the app refuses it
        path = png_claiming(folder / "huge.png", 10_000, 10_000)
    elif kind == "tiny":
        path = folder / "tiny.png"
        Image.new("RGB", (3, 3)).save(path)
    return path


BAD_INPUTS = {
    "text": r"notes\.txt is not an image this app can read \(cannot identify image file",
    "empty": r"empty\.png is not an image this app can read",
    "truncated": r"cut\.png is not an image this app can read \(.*truncated",
    "bomb": r"bomb\.png is not an image this app can read \(.*could be decompression bomb",
    "huge": r"huge\.png is 10000x10000 pixels, more than the 89,478,485 pixels",
    "tiny": r"tiny\.png is 3x3 pixels, smaller than one 4x4 patch",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_a_bad_image_is_one_line_naming_the_file(kind, tmp_path):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ValueError, match=BAD_INPUTS[kind]) as err:
        check_image(path, 4)
    assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)


def test_other_modes_are_converted_and_16_bit_keeps_its_range(models, tmp_path):
    digits = models[0]
    rng = np.random.default_rng(3)
    grey8 = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(grey8, "L").save(tmp_path / "grey.png")
    Image.fromarray(grey8, "L").convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey8, "L").convert("P").save(tmp_path / "palette.png")
    # the same picture at 16 bits: the 8-bit values in the top byte
    Image.fromarray((grey8.astype(np.uint16) << 8) | 0x7F).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"

    reference = np.asarray(check_image(tmp_path / "grey.png", 4))
    for name in ("rgba.png", "palette.png", "grey16.png"):
        picture = check_image(tmp_path / name, 4)
        assert picture.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(picture), reference, err_msg=name)
        top = analyse(digits, picture).predictions
        assert top == analyse(digits, Image.fromarray(reference)).predictions


# ------------------------------------------------------------------------------- the CLI


def test_the_cli_takes_several_checkpoints_and_listens_on_localhost():
    args = build_parser().parse_args(["app", "--checkpoint", "a.pt", "--checkpoint", "b.pt"])
    assert args.checkpoint == ["a.pt", "b.pt"] and args.model is None and not args.share
    assert (args.host, args.port) == (app_module.DEFAULT_HOST, app_module.DEFAULT_PORT)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "checkpoint not found: "),
        ("garbage", "is not a readable safetensors file"),
        ("not-torch", "is not a torch checkpoint"),
    ],
)
def test_a_bad_checkpoint_fails_in_one_line_before_any_server(
    kind, message, checkpoints, tmp_path, capsys, monkeypatch
):
    launched = []
    monkeypatch.setattr(app_module.gr.Blocks, "launch", lambda *a, **k: launched.append(1))
    bad = {
        "missing": tmp_path / "nowhere.safetensors",
        "garbage": tmp_path / "model.safetensors",
        "not-torch": tmp_path / "best.pt",
    }[kind]
    if kind == "garbage":
        bad.write_bytes(b"not a safetensors file")
    elif kind == "not-torch":
        bad.write_bytes(b"PK\x03\x04 a broken zip archive")
    # the good checkpoint first: the bad one still stops everything
    assert main(["app", "--checkpoint", str(checkpoints[0]), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cait app: error: ") and message in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not launched


def test_ctrl_c_stops_cait_app_with_130_and_one_line(checkpoints, capsys, caplog):
    """Gradio's block_thread swallowed Ctrl-C, so `cait app` exited 0 (issue 28)."""
    serving = threading.Event()

    class Started(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "Ctrl+C stops it":
                serving.set()

    returned = threading.Event()

    def press_ctrl_c():  # once the server waits for it, as a user at the terminal
        serving.wait(timeout=600)  # a server that never says so is stopped all the same
        time.sleep(0.5)
        if not returned.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    caplog.set_level(logging.INFO, logger="cait.app")
    started = Started()
    logging.getLogger("cait.app").addHandler(started)
    port = free_port()
    # Ctrl-C as at a terminal, whatever started the tests: a shell's background job (`&`)
    # ignores SIGINT, and the test would wait for a server that never stops
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=press_ctrl_c, daemon=True)
    thread.start()
    try:
        status = main(["app", "--checkpoint", str(checkpoints[0]), "--port", str(port)])
    finally:
        returned.set()
        logging.getLogger("cait.app").removeHandler(started)
        serving.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)
    out, err = capsys.readouterr()
    assert status == 130
    assert err.strip().splitlines()[-1] == "cait app: interrupted"
    assert "Keyboard interruption" not in out and "Closing server" not in out
    with socket.socket() as s:  # the server is gone: its port is free again
        s.bind(("127.0.0.1", port))


# ---------------------------------------------------------------- the server and its API


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """The page for both models on 127.0.0.1 at a free port; its URL."""
    app = build_app(models)
    port = free_port()
    serve(app, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def test_the_api_answers_like_cait_predict_and_survives_bad_files(
    client, checkpoints, tmp_path, capsys
):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image = DIGIT_EXAMPLES[1]
    answer = client.predict(handle_file(str(image)), str(checkpoints[0]), 3, api_name="/predict")
    assert [p["name"] for p in answer["predictions"]][:1] == [
        _predicted_by_cli(checkpoints[0], image, capsys)
    ]
    assert len(answer["predictions"]) == 3
    assert np.asarray(answer["class_attention"]).shape == (2, 2, 4, 4)

    for kind, message in BAD_INPUTS.items():
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(_bad_file(kind, tmp_path))), api_name="/predict")
    again = client.predict(handle_file(str(image)), api_name="/predict")
    assert again["predictions"][0] == answer["predictions"][0]


def test_a_busy_port_is_one_line(server, checkpoints, capsys):
    port = server.rstrip("/").rsplit(":", 1)[1]
    assert main(["app", "--checkpoint", str(checkpoints[0]), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cait app: error: cannot serve on 127.0.0.1:{port}: "), err
    assert "\n" not in err and "Traceback" not in err


def test_eight_simultaneous_requests_are_all_answered(client, checkpoints):
    from gradio_client import handle_file

    pictures = [*DIGIT_EXAMPLES, *PHOTO_EXAMPLES] * 2  # 10 files; 8 requests
    jobs = [
        client.submit(handle_file(str(p)), str(checkpoints[i % 2]), api_name="/predict")
        for i, p in enumerate(pictures[:8])
    ]
    answers = [job.result(timeout=120) for job in jobs]
    assert len(answers) == 8
    for i, answer in enumerate(answers):
        expected_names = list(DigitsDataset.classes) if i % 2 == 0 else PHOTO_CLASSES
        assert answer["model"] == str(checkpoints[i % 2])
        assert answer["predictions"][0]["name"] in expected_names


def test_the_api_does_not_read_server_files_it_was_not_sent(server, checkpoints, tmp_path):
    """A file path that did not come through Gradio's upload is refused, not read (raw
    HTTP: gradio_client would upload the file first); the same file uploaded is answered."""
    import httpx

    image = tmp_path / "elsewhere.png"
    shutil.copy(DIGIT_EXAMPLES[0], image)

    def call(http: httpx.Client, path: str) -> str:
        file = {"path": path, "meta": {"_type": "gradio.FileData"}}
        started = http.post(
            "gradio_api/call/predict", json={"data": [file, str(checkpoints[0]), 3]}
        )
        assert started.status_code == 200, started.text
        return http.get(f"gradio_api/call/predict/{started.json()['event_id']}").text

    with httpx.Client(base_url=server, timeout=60) as http:
        refused = call(http, str(image))
        assert "event: error" in refused and "predictions" not in refused, refused
        with open(image, "rb") as f:
            (uploaded,) = http.post("gradio_api/upload", files={"files": f}).json()
        answered = call(http, uploaded)
        assert "event: complete" in answered and "predictions" in answered, answered


# ------------------------------------------------- only what was uploaded is read (issue 28)


def _outside_cases(folder: Path, uploads: Path) -> dict[str, Path]:
    """Paths a hostile request may name: ``folder`` is outside the upload folder,
    ``uploads`` a folder inside it that the cases may write into."""
    image = folder / "secret.png"
    shutil.copy(DIGIT_EXAMPLES[0], image)
    (folder / "notes.txt").write_text("not an image\n")
    link = uploads / "link.png"
    link.symlink_to(image)
    fifo = uploads / "pipe.png"
    os.mkfifo(fifo)
    up_to_root = [".."] * (len(uploads.parts) - 1)
    way_out = Path(uploads, *up_to_root, *image.parts[1:])  # uploads/../../tmp/.../secret.png
    assert way_out.is_file() and ".." in way_out.parts
    return {
        "an image outside": image,
        "a text file outside": folder / "notes.txt",
        "a missing file": folder / "nowhere.png",
        "a folder": folder,
        "the upload folder itself": uploads.parent,
        "a way out with ..": way_out,
        "a link out of the upload folder": link,
        "a named pipe in the upload folder": fifo,
    }


def test_only_regular_files_inside_the_upload_folder_are_accepted(tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    inside = uploads / "abc" / "digit.png"
    shutil.copy(DIGIT_EXAMPLES[0], inside)
    (uploads / "abc" / "again.png").symlink_to(inside)  # a link that stays inside
    assert uploaded_file(str(inside), uploads) == inside
    assert uploaded_file(str(uploads / "abc" / "again.png"), uploads) == inside

    outside = tmp_path / "outside"
    outside.mkdir()
    cases = _outside_cases(outside, uploads / "abc")
    cases.update({"not a string": {"path": str(inside)}, "a NUL byte": f"{inside}\0"})
    for case, path in cases.items():
        with pytest.raises(ValueError) as err:
            uploaded_file(path if isinstance(path, dict | str) else str(path), uploads)
        assert str(err.value) == NOT_UPLOADED, case  # the same words, whatever the reason


def _call(http, endpoint: str, data: list) -> str:
    """One call of an API endpoint by raw HTTP: the event stream of its answer."""
    started = http.post(f"gradio_api/call/{endpoint}", json={"data": data})
    assert started.status_code == 200, started.text
    return http.get(f"gradio_api/call/{endpoint}/{started.json()['event_id']}").text


def test_no_endpoint_reads_a_server_file_it_was_not_sent(server, checkpoints, tmp_path):
    """Raw HTTP with a bare ``{"path": ...}`` (no FileData meta, which Gradio would check):
    every case gets one refusal, in the same words, and the named pipe stalls nothing."""
    import httpx

    with httpx.Client(base_url=server, timeout=60) as http:
        with open(DIGIT_EXAMPLES[0], "rb") as f:
            (uploaded,) = http.post("gradio_api/upload", files={"files": f}).json()
        cases = _outside_cases(tmp_path, Path(uploaded).parent)
        answers = {}
        for case, path in cases.items():
            payload = {"path": str(path)}
            page = _call(http, "page", [payload, str(checkpoints[0]), 2, "mean of heads"])
            assert "Cannot use this image" in page and NOT_UPLOADED in page, (case, page)
            assert "%)" not in page and str(tmp_path) not in page, (case, page)
            api = _call(http, "predict", [payload, str(checkpoints[0]), 3])
            assert "event: error" in api and "predictions" not in api, (case, api)
            assert str(tmp_path) not in api, (case, api)
            answers[case] = (page.split("data:", 1)[1], api.split("data:", 1)[1])
        assert len(set(answers.values())) == 1, answers  # nothing tells the cases apart
        # the same image, uploaded, is answered by both
        page = _call(http, "page", [{"path": uploaded}, str(checkpoints[0]), 2, "mean of heads"])
        assert "%)" in page and "Cannot use" not in page, page
        api = _call(http, "predict", [{"path": uploaded}, str(checkpoints[0]), 3])
        assert "event: complete" in api and "predictions" in api, api


def test_every_value_a_client_sends_is_checked_and_refused_in_one_line(server, checkpoints, capfd):
    """The image events take the client's values undecoded (preprocess=False): a model,
    block or head that the page would never send is a message, not a traceback; /predict's
    too. The server logs no traceback for any refusal."""
    import httpx

    label = str(checkpoints[0])
    with httpx.Client(base_url=server, timeout=60) as http:
        with open(DIGIT_EXAMPLES[0], "rb") as f:
            (uploaded,) = http.post("gradio_api/upload", files={"files": f}).json()
        file = {"path": uploaded}
        capfd.readouterr()
        page_cases = {
            "unknown model": ([file, "nope.pt", 2, "mean of heads"], "unknown model 'nope.pt'"),
            "model not a name": ([file, ["x"], 2, "mean of heads"], "unknown model ['x']"),
            "block not a number": ([file, label, "2", "mean of heads"], "SA block must be"),
            "no block": ([file, label, None, "mean of heads"], "SA block must be"),
            "no such head": ([file, label, 2, "head 9"], "SA head must be one of"),
            "head not a name": ([file, label, 2, 1], "SA head must be one of"),
        }
        for case, (data, message) in page_cases.items():
            page = _call(http, "page", data)
            assert "event: complete" in page and "Cannot use this image" in page, (case, page)
            assert message in page, (case, page)
        assert "%)" in _call(http, "page", [file, label, 2, "head 1"])  # a good head
        api_cases = {
            "topk not a number": ([file, label, "3"], "topk must be an integer >= 1"),
            "topk 0": ([file, label, 0], "topk must be >= 1, got 0"),
            "unknown model": ([file, "nope.pt", 3], "unknown model 'nope.pt'"),
        }
        for case, (data, message) in api_cases.items():
            api = _call(http, "predict", data)
            assert "event: error" in api and message in api, (case, api)
        outside = {"path": str(DIGIT_EXAMPLES[0])}
        assert NOT_UPLOADED in _call(http, "predict", [outside, label, 3])
    assert "Traceback" not in capfd.readouterr().err


# -------------------------------------------------------------------- in a real browser

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (make install puts it there)"
)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (make install puts it there)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # root (as on CI) cannot use chromium's sandbox; the page is our own
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server)
    page.wait_for_selector("#image")
    yield page
    context.close()


def _upload(page, path: Path) -> None:
    page.set_input_files("#image input[type=file]", str(path))


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_for_answer(page, name: str) -> None:
    page.wait_for_function(
        "name => document.querySelector('#status')?.innerText.includes(name)", arg=name
    )


@needs_chromium
def test_upload_a_digit_and_see_the_prediction_and_every_map(page, checkpoints, capsys):
    image = DIGIT_EXAMPLES[2]
    expected = _predicted_by_cli(checkpoints[0], image, capsys)
    _upload(page, image)
    _wait_for_answer(page, "ms.")
    assert _status(page).startswith(expected)
    top = page.locator("#top [data-testid='label-output-value']").inner_text()
    assert top.strip() == expected

    captions = page.locator("#ca-maps .caption-label").all_inner_texts()
    expected_captions = [f"block {b}, {h}" for b in (1, 2) for h in ("head 0", "head 1", "mean")]
    assert captions == expected_captions
    assert page.locator("#ca-maps img").count() == len(expected_captions)
    page.locator("#residuals img").wait_for()  # the residual plot follows the answer


@needs_chromium
def test_click_a_patch_and_the_self_attention_view_changes(page):
    _upload(page, DIGIT_EXAMPLES[0])
    _wait_for_answer(page, "ms.")
    page.wait_for_function(
        "() => { const i = document.querySelector('#sa-view img'); "
        "return i?.complete && i.naturalWidth > 0; }"
    )
    view = page.locator("#sa-view img")
    before = view.get_attribute("src")
    pixels_before = _bottom_left_patch(view.screenshot())
    box = view.bounding_box()
    page.mouse.click(box["x"] + 5, box["y"] + 5)  # the top-left patch
    page.wait_for_function(
        "src => document.querySelector('#sa-view img')?.getAttribute('src') !== src",
        arg=before,
    )
    # the map, not only the outline, changed: the bottom-left patch is outlined by neither
    # the first query (the centre) nor the clicked one
    assert not np.array_equal(_bottom_left_patch(view.screenshot()), pixels_before)


def _bottom_left_patch(png: bytes) -> np.ndarray:
    """The inside of the bottom-left patch of a 4x4 grid picture."""
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = picture.shape[:2]
    return picture[round(0.8 * h) : round(0.95 * h), round(0.05 * w) : round(0.2 * w)]


@needs_chromium
def test_a_text_file_shows_a_message_then_a_good_image_is_answered(page, tmp_path):
    # Gradio's upload box refuses a file that is not named as an image, in the page
    _upload(page, _bad_file("text", tmp_path))
    page.get_by_text("Invalid file type: notes.txt. Only image/* allowed.").wait_for()
    # one that is reaches the app, which names the file and the reason
    fake = tmp_path / "fake.png"
    shutil.copy(_bad_file("text", tmp_path), fake)
    _upload(page, fake)
    _wait_for_answer(page, "Cannot use this image")
    assert "fake.png is not an image this app can read" in _status(page)
    assert page.locator("#ca-maps img").count() == 0  # no answer of an earlier image left
    _upload(page, DIGIT_EXAMPLES[1])
    _wait_for_answer(page, "ms.")
    assert "Cannot use" not in _status(page)
    assert page.locator("#ca-maps img").count() == 6


@needs_chromium
def test_every_bad_image_gets_its_message_in_the_page(page, tmp_path):
    for kind, message in BAD_INPUTS.items():
        if kind == "text":
            continue  # the test above
        path = _bad_file(kind, tmp_path)
        _upload(page, path)
        _wait_for_answer(page, f"{path.name} ")
        assert re.search(message, _status(page)), (kind, _status(page))
    _upload(page, DIGIT_EXAMPLES[0])
    _wait_for_answer(page, "ms.")


@needs_chromium
def test_the_model_chooser_switches_model_and_examples(page, checkpoints):
    assert page.get_by_text("Digits", exact=True).is_visible()
    page.locator("#model input").click()
    page.get_by_role("option", name=str(checkpoints[1])).click()
    page.get_by_text("Photos", exact=True).wait_for()
    assert not page.get_by_text("Digits", exact=True).is_visible()
    page.locator("img[src*='chelsea']").first.click()
    _wait_for_answer(page, "ms.")
    assert _status(page).split(" (")[0] in PHOTO_CLASSES
    assert str(checkpoints[1]) in _status(page)
    assert page.locator("#ca-maps img").count() == 2 * (2 + 1)


def _picture(page, selector: str) -> np.ndarray:
    """The pixels of the PNG an image component shows, as the server sent them."""
    src = page.locator(f"{selector} img").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


@needs_chromium
def test_the_method_chooser_shows_the_chosen_methods_map(page, models):
    """The map under the chooser is the library's (explanation_view) for the uploaded
    image, first by rollout, then by each method chosen."""
    image = DIGIT_EXAMPLES[1]
    analysis = analyse(models[0], check_image(image, 4))
    _upload(page, image)
    _wait_for_answer(page, "ms.")
    for method in METHODS:
        if method != METHODS[0]:
            page.locator("#method").get_by_text(method, exact=True).click()
        page.wait_for_function(
            "m => document.querySelector('#explained')?.innerText.startsWith(m + ':')", arg=method
        )
        expected, caption = explanation_view(analysis, models[0].model, method)
        assert caption in page.locator("#explained").inner_text()
        assert analysis.predictions[0]["name"] in caption
        shown = _picture(page, "#explained").astype(int)
        assert np.abs(shown - np.asarray(expected).astype(int)).max() <= 1, method


def test_the_examples_ship_with_the_package():
    assert len(DIGIT_EXAMPLES) == 3 and len(PHOTO_EXAMPLES) == 2
    for path in [*DIGIT_EXAMPLES, *PHOTO_EXAMPLES]:
        with Image.open(path) as img:
            assert min(img.size) >= 16


FILE_DATA = {"_type": "gradio.FileData"}  # the tag Gradio checks a payload's path by


def _queue_call(http, fn_index: int, data: list, session: str) -> str:
    """One call of any event (by its index, as the browser makes it): its answer's stream."""
    started = http.post(
        "gradio_api/queue/join",
        json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None},
    )
    if started.status_code != 200:
        return started.text
    answer = ""
    with http.stream("GET", f"gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            answer += line + "\n"
            if "process_completed" in line or "close_stream" in line:
                break
    return answer


def test_a_scan_of_every_event_reads_no_file_outside_the_uploads(server, tmp_path, monkeypatch):
    """Every event of the page, called as a hostile client would (by index, private ones
    too), with each input in turn naming a path outside the upload folder (bare or as
    FileData), the others at their defaults: no file outside the uploads is opened."""
    import builtins

    import httpx
    import PIL.Image

    opened: list[str] = []
    real_open, real_image_open = builtins.open, PIL.Image.open

    def record_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, str | os.PathLike) else repr(file))
        return real_open(file, *args, **kwargs)

    def record_image_open(fp, *args, **kwargs):
        opened.append(os.fspath(fp) if isinstance(fp, str | os.PathLike) else repr(fp))
        return real_image_open(fp, *args, **kwargs)

    with httpx.Client(base_url=server, timeout=60) as http:
        config = http.get("config").json()
        # an image no other test uploads: Gradio's upload folder is named by the content, and
        # the cases below write a link and a pipe into it
        mine = tmp_path / "scan.png"
        Image.fromarray(np.full((16, 16, 3), 123, dtype=np.uint8)).save(mine)
        with open(mine, "rb") as f:
            (uploaded,) = http.post("gradio_api/upload", files={"files": f}).json()
        cases = _outside_cases(tmp_path, Path(uploaded).parent)
        del cases["a named pipe in the upload folder"]  # opening one would block: its own test
        defaults = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
        monkeypatch.setattr(builtins, "open", record_open)
        monkeypatch.setattr(PIL.Image, "open", record_image_open)
        calls = 0
        for dep in config["dependencies"]:
            for slot in range(len(dep["inputs"])):
                for path in cases.values():
                    for payload in ({"path": str(path)}, {"path": str(path), "meta": FILE_DATA}):
                        data = [defaults.get(i) for i in dep["inputs"]]
                        data[slot] = payload
                        _queue_call(http, dep["id"], data, f"scan{calls}")
                        calls += 1
    outside = {str(p) for p in cases.values()} | {os.path.realpath(p) for p in cases.values()}
    assert calls > 50 and not [p for p in opened if p in outside], [
        p for p in opened if p in outside
    ]
