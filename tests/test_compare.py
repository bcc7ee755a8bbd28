"""``ps3 compare``: every strategy on one backbone, run as a user would, and its figure."""

import numpy as np
import pytest
import torch
from PIL import Image

import ps3.strategies as S
from golden import MODEL_DIR
from ps3.cli import main
from ps3.compare import draw_figure, random_model, run_strategy


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.fromarray(rng.integers(0, 255, (200, 500, 3), dtype=np.uint8)).save(path)
    return path


def _table(stdout):
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ") and "strategy" not in line]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


@pytest.mark.slow
def test_compare_every_strategy_at_a_budget(tmp_path, photo, run_cli):
    proc = run_cli("compare", photo, "--backbone", "tiny", "--budget", "900", "--out", tmp_path, "--no-warmup")
    assert proc.returncode == 0, proc.stderr
    table = _table(proc.stdout)
    assert list(table) == list(S.names())
    for name, (knob, tokens, text, passes, seconds, mib) in table.items():
        kw = {}
        if knob != "defaults":  # the printed knob gives the printed count
            key, value = knob.split("=", 1)
            kw[key] = value if value.startswith("(") else int(value.replace(",", ""))
        if name == "ps3":
            kw.update(scales=(378, 756, 1512, 3780), budgets=(85, 341, 2134))
        plan = S.plan(name, 200, 500, **kw)
        assert (f"{plan.num_tokens:,}", int(text), int(passes)) == (tokens, plan.num_text_tokens, plan.backbone_passes)
        assert float(seconds) > 0 and float(mib) >= 0
    assert abs(int(table["ps3"][1].replace(",", "")) - 900) <= 2
    assert table["qwen2_vl"][1] == "126"  # 196 × 504 px at most: Qwen2-VL does not upscale to meet a budget
    figure = Image.open(tmp_path / "compare_wide_900.png")
    assert figure.width > 700 and figure.height > 4 * 150


def test_compare_with_a_model_directory(photo, capsys):
    assert main(["compare", str(photo), "--backbone", str(MODEL_DIR), "--strategies", "anyres,ps3", "--out", "",
                 "--no-warmup"]) == 0
    table = _table(capsys.readouterr().out)
    assert table["ps3"][1] == "24"  # 56/112/224 px fixture: 2×2 low-res + its budgets' blocks
    assert table["anyres"][1] == f"{S.plan('anyres', 200, 500).num_tokens:,}"


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be a positive number of tokens, got 0"),
    (["--strategies", "s2,tiles"], "--strategies: unknown strategy 'tiles'"),
    (["--backbone", "no/such/dir"], "--backbone"),
])
def test_user_errors_are_one_line(photo, args, message, capsys):
    assert main(["compare", str(photo), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ps3 compare: error: ") and message in lines[0]


def test_figure_marks_what_a_strategy_never_sees():
    vision = random_model("tiny", torch.device("cpu"))
    image = torch.rand(3, 100, 400)
    rows = [run_strategy(name, vision, image, None, torch.device("cpu"), warmup=False) for name in ("s2", "qwen2_vl")]
    fig = np.asarray(draw_figure(Image.new("RGB", (400, 100), (255, 255, 255)), rows, "t"))
    # s2 centre-crops a 4:1 image: its panel's left edge is the dim never-seen grey, qwen2_vl's is coloured
    s2_edge, qwen_edge = fig[36 + 44 + 20, 8 + 5], fig[36 + 44 + 20, 8 + 360 + 8 + 5]
    assert s2_edge[0] == s2_edge[1] == s2_edge[2] and qwen_edge[0] != qwen_edge[2]
