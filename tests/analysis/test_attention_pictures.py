"""What an attention grid shows (issue 21): a colour scale, the token grid as blocks by
default or smoothed on request, and blocks numbered from 1 in pictures and file names."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randomize_
from test_analysis import GREY, _grey_image  # tests/analysis is on the path (no __init__)

import cait
from cait.analysis.attention import (
    COLOURBAR_PX,
    PAD_PX,
    GridLayout,
    render_attention_grid,
    save_attention_maps,
)
from cait.models.build import LoadedModel

GRID = 4  # cait_digits_16: a 4 x 4 token grid


def _grid(style: str) -> tuple[np.ndarray, GridLayout]:
    rng = np.random.default_rng(0)
    maps = rng.random((1, 2, GRID, GRID)).astype(np.float32)
    image = np.full((16, 16, 3), 0.5, np.float32)
    picture = render_attention_grid(image, maps, ["row"], ["a", "b"], style=style)
    return np.asarray(picture.convert("RGB"), dtype=np.float32), GridLayout(1, 3)


def test_every_grid_has_a_colour_scale_from_dark_to_light():
    pixels, layout = _grid("blocks")
    assert pixels.shape[:2] == layout.size[::-1]
    # the colour scale: a ramp of the colour map along a row of the band under the grid
    row = pixels[layout.legend_top + 4 + COLOURBAR_PX[1] // 2, PAD_PX + 1 : PAD_PX + 255]
    brightness = row.sum(-1)
    assert brightness[0] < 60 and brightness[-1] > 500  # inferno: black to pale yellow
    assert (np.diff(brightness) >= -3).all()  # brighter all the way along


@pytest.mark.parametrize("style, flat", [("blocks", True), ("smooth", False)])
def test_blocks_draw_one_flat_square_per_token_and_smooth_does_not(style, flat):
    pixels, layout = _grid(style)
    left, top, right, bottom = layout.box(0, 1)
    cell = pixels[top:bottom, left:right]
    side = layout.cell // GRID
    inner = cell[side + 4 : 2 * side - 4, side + 4 : 2 * side - 4]  # inside token (1, 1)
    assert bool(inner.std(axis=(0, 1)).max() < 0.5) == flat


def test_blocks_are_the_default_and_an_unknown_style_is_refused(tmp_path):
    assert np.array_equal(
        np.asarray(render_attention_grid(np.zeros((4, 4, 3)), np.ones((1, 1, 2, 2)), ["r"], ["a"])),
        np.asarray(
            render_attention_grid(
                np.zeros((4, 4, 3)), np.ones((1, 1, 2, 2)), ["r"], ["a"], style="blocks"
            )
        ),
    )
    loaded = LoadedModel(randomize_(cait.create_model("cait_digits_16")).eval(), GREY, None, None)
    image = _grey_image(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="style must be one of"):
        save_attention_maps(loaded, [str(image)], tmp_path / "out", style="blobs")


def test_self_attention_files_use_the_block_number_of_the_pictures(tmp_path):
    loaded = LoadedModel(randomize_(cait.create_model("cait_digits_16")).eval(), GREY, None, None)
    image = _grey_image(tmp_path / "grey.png")
    records = save_attention_maps(loaded, [str(image)], tmp_path / "out", sa_block=0)
    assert records[0]["self_attention_png"].endswith("grey_sa1.png")  # model.blocks[0]
    assert (tmp_path / "out" / "grey_sa1.npy").exists()
