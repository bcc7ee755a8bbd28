"""Property test of the data pipeline: a fuzz of the JSON/box record parser through real shards
(a bad record is skipped and counted, never a crash). Box → gt map properties: test_data_boxes."""
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from webdataset import TarWriter

from ps3.train.loader import build_dataloader
from test_train_data import _jpeg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"text": json_values | st.lists(st.text(max_size=20), max_size=3),
                                        "box": json_values | st.lists(st.lists(st.floats(-50, 80), min_size=4,
                                                                                max_size=4), max_size=3),
                                        "global_text": json_values}),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records, raw=st.booleans(), junk=st.binary(max_size=20))
def test_any_record_is_parsed_or_skipped(record, raw, junk):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "i").mkdir()
        (root / "t").mkdir()
        with TarWriter(str(root / "i" / "image_00000.tar"), encoder=False, mtime=0) as w:
            w.write({"__key__": "a", "jpg": _jpeg(40, 30)})
        payload = junk if raw else json.dumps(record, allow_nan=True).encode()
        with TarWriter(str(root / "t" / "text_box_00000.tar"), encoder=False, mtime=0) as w:
            w.write({"__key__": "a", "json": payload})
        options = dict(image_size=8, mean=[0.5] * 3, std=[0.5] * 3, batch_size=1, shuffle=False)
        loader = build_dataloader(str(root / "i"), str(root / "t"), **options)
        batches = list(loader)
        if batches:  # a usable caption came through: its map is a valid 0/1 map
            assert batches[0]["gt_selection_maps"].shape == (1, 8, 8)
            assert len(batches[0]["texts"]) == 1 and batches[0]["texts"][0].strip()
        else:
            assert loader.counter.total >= 1
        strict = build_dataloader(str(root / "i"), str(root / "t"), strict=True, **options)
        try:
            assert len(list(strict)) == len(batches)
        except ValueError as exc:  # strict mode: the reason names shard and key
            assert "key 'a'" in str(exc) and "text_box_00000.tar" in str(exc)
