"""tools/check_sizes.py: the package is within its size limits, and an over-long function or
module is reported by name."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_sizes", ROOT / "tools" / "check_sizes.py")
check_sizes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_sizes)


def test_the_package_is_within_its_limits():
    assert check_sizes.violations(ROOT / "src", ROOT) == []


def test_long_functions_and_modules_are_named(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(f"class A:\n    def long(self):\n{body}\n\n\ndef short():\n    pass\n")
    (tmp_path / "pkg" / "b.py").write_text("x = 1\n" * 451)
    assert check_sizes.violations(tmp_path / "pkg", tmp_path) == ["pkg/a.py::A.long: 61 lines (limit 60)",
                                                                   "pkg/b.py: 451 lines (limit 450)"]
