"""format_features_into_feature_maps round-trips: tokens placed on the maps read back in canvas
order are the tokens, for random selections (hypothesis)."""
import torch
from hypothesis import given, settings, strategies as st

import ps3
from golden import MODEL_DIR

ENCODER = ps3.PS3VisionModel.from_pretrained(MODEL_DIR).vision_model


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), counts=st.tuples(st.integers(0, 32), st.integers(0, 128)), seed=st.integers(0, 999),
       square=st.booleans())
def test_feature_maps_round_trip(batch, counts, seed, square):
    g = torch.Generator().manual_seed(seed)
    sizes = [(8, 8), (16, 16)] if square else [(8, 4), (16, 8)]
    maps = []
    for (h, w), n in zip(sizes, counts):
        n = min(n, h * w)
        m = torch.zeros(batch, h * w, dtype=torch.long)
        for b in range(batch):
            m[b, torch.randperm(h * w, generator=g)[:n]] = 1
        maps.append(m.view(batch, h, w))
    n_tokens = 16 + sum(int(m[0].sum()) for m in maps)
    feats = torch.randn(batch, n_tokens, 64, generator=g)
    out = ENCODER.format_features_into_feature_maps(feats, maps)
    assert [tuple(o.shape) for o in out] == [(batch, 64, 4, 4)] + [(batch, 64, h, w) for h, w in sizes]
    canvas = torch.cat([o.flatten(2) for o in out], dim=2).transpose(1, 2)  # (B, cells, C) in canvas order
    chosen = torch.cat([torch.ones(batch, 16, dtype=torch.bool)] + [m.flatten(1).bool() for m in maps], dim=1)
    for b in range(batch):
        torch.testing.assert_close(canvas[b][chosen[b]], feats[b], atol=0, rtol=0)
        assert canvas[b][~chosen[b]].abs().sum() == 0
