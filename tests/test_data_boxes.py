"""ps3.data.boxes: clipping boxes to the image and their ground-truth maps (design §5)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ps3.data.boxes import box_cells, box_to_gt_map, clip_box


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 500), height=st.integers(1, 500), size=st.integers(1, 64), data=st.data())
def test_box_map_is_the_scaled_box_rectangle(width, height, size, data):
    x0 = data.draw(st.floats(0, width, allow_nan=False))
    x1 = data.draw(st.floats(0, width, allow_nan=False))
    y0 = data.draw(st.floats(0, height, allow_nan=False))
    y1 = data.draw(st.floats(0, height, allow_nan=False))
    if x1 <= x0 or y1 <= y0:
        with pytest.raises(ValueError):
            box_to_gt_map([x0, y0, x1, y1], (width, height), size)
        return
    gt = box_to_gt_map([x0, y0, x1, y1], (width, height), size)
    assert gt.shape == (size, size) and set(gt.unique().tolist()) <= {0.0, 1.0}
    rows, cols = gt.any(1).nonzero().flatten(), gt.any(0).nonzero().flatten()
    # One filled rectangle: floor(start)..ceil(end) of the box squashed to the map, clipped.
    r0, r1 = math.floor(y0 * size / height), min(math.ceil(y1 * size / height), size - 1)
    c0, c1 = math.floor(x0 * size / width), min(math.ceil(x1 * size / width), size - 1)
    assert rows.tolist() == list(range(min(r0, size - 1), r1 + 1))
    assert cols.tolist() == list(range(min(c0, size - 1), c1 + 1))
    assert gt.sum() == len(rows) * len(cols)


def test_global_caption_map_is_whole_image():
    assert torch.equal(box_to_gt_map(None, (30, 20), 8), torch.ones(8, 8))


def test_box_map_exact_for_hand_computed_case():
    # Image 100×50 squashed to 10×10: x scales by 1/10, y by 1/5.
    # Box [15, 5, 42.5, 20] → x 1.5..4.25 → columns 1..5; y 1..4 → rows 1..4 (inclusive).
    expected = torch.zeros(10, 10)
    expected[1:5, 1:6] = 1
    assert torch.equal(box_to_gt_map([15, 5, 42.5, 20], (100, 50), 10), expected)
    # A box sticking out of the image is clipped first: x0 -30 → 0; y1 99 → 50 → row 10 → clipped to 9.
    clipped = torch.zeros(10, 10)
    clipped[1:10, 0:6] = 1
    assert torch.equal(box_to_gt_map([-30, 5, 42.5, 99], (100, 50), 10), clipped)
    assert torch.equal(box_to_gt_map(None, (100, 50), 10), torch.ones(10, 10))
    with pytest.raises(ValueError, match="inverted"):
        box_to_gt_map([5, 5, 1, 9], (100, 50), 10)


def test_clip_box_names_why_a_box_is_unusable():
    assert clip_box([-5, 2, 30, 99], 20, 10) == (0.0, 2.0, 20.0, 10.0)
    assert clip_box((1, 2, 3, 4), 20, 10) == (1.0, 2.0, 3.0, 4.0)
    for bad in ([1, 2, 3], "1234", [1, 2, 3, "4"], [0, 0, True, 5], [0, 0, float("nan"), 5],
                [0, 0, float("inf"), 5], [5, 0, 1, 5], [0, 5, 5, 5], None):
        assert clip_box(bad, 20, 10) == "bad_box", bad
    assert clip_box([25, 0, 30, 5], 20, 10) == "box_outside_image"
    assert clip_box([0, -9, 5, 0], 20, 10) == "box_outside_image"


def test_non_square_maps_scale_each_axis_separately():
    # Image 100×50 squashed to H=5 rows × W=20 columns: x scales by 1/5, y by 1/10.
    # Box [15, 5, 42.5, 20] → x 3..8.5 → columns 3..9; y 0.5..2 → rows 0..2.
    gt = box_to_gt_map([15, 5, 42.5, 20], (100, 50), (5, 20))
    expected = torch.zeros(5, 20)
    expected[0:3, 3:10] = 1
    assert torch.equal(gt, expected)
    assert box_cells((15, 5, 42.5, 20), (100, 50), (5, 20)) == (0, 2, 3, 9)
    # A square size and the same (S, S) pair give the same map.
    assert torch.equal(box_to_gt_map([15, 5, 42.5, 20], (100, 50), 10), box_to_gt_map([15, 5, 42.5, 20], (100, 50),
                                                                                          (10, 10)))
    assert torch.equal(box_to_gt_map(None, (100, 50), (3, 7)), torch.ones(3, 7))
    for bad in (0, (4,), (4, 0), (4.0, 4), True):
        with pytest.raises(ValueError, match="image_size"):
            box_to_gt_map(None, (100, 50), bad)
