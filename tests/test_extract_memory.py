"""``ps3 extract`` writes features as each batch finishes: the peak resident memory of a run over
200 images is within 10% of a run over 20 (each run a fresh process)."""
import subprocess
import sys

import pytest

from extract_helpers import environment, fast_model, make_images

pytestmark = pytest.mark.slow  # every test here starts subprocesses

# Runs the CLI's entry point in a fresh interpreter and prints that process's peak RSS (KiB).
PEAK_RSS = """
import resource, sys
from ps3.cli import main
assert main(sys.argv[1:]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(images, out, model) -> int:
    # --all --layers 4 --feature-maps: ~430 KB of features per image, ~86 MB for 200 if they were kept.
    args = ["extract", images, "--out", out, "--model", model, "--all", "--layers", "4", "--feature-maps",
            "--workers", "0", "--batch-size", "4", "--shard-size", "50", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    model = fast_model(tmp_path / "model")
    paths = make_images(tmp_path / "many", 200)
    (tmp_path / "few").mkdir()
    for path in paths[:20:2]:  # 20 of the same images: 10 from the top directory, 10 from sub/
        (tmp_path / "few" / path.name).hardlink_to(path)
    for path in paths[1:20:2]:
        (tmp_path / "few" / "sub").mkdir(exist_ok=True)
        (tmp_path / "few" / "sub" / path.name).hardlink_to(path)
    few = peak_rss_kib(tmp_path / "few", tmp_path / "out_few", model)
    many = peak_rss_kib(tmp_path / "many", tmp_path / "out_many", model)
    print(f"peak RSS: 20 images {few / 1024:.0f} MiB, 200 images {many / 1024:.0f} MiB")
    assert many <= 1.10 * few, (few, many)
