"""The breaking-change guard: `buf breaking` against the committed image
refuses a renumbered, retyped or removed field and accepts an addition."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"
PROTO = Path("protos/ledger/v1/ledger.proto")


def breaking(tmp_path: Path, old: str, new: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / PROTO
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new, 1))
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(ROOT / "protos" / "ledger.v1.binpb")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("change", "old", "new"),
    [
        ("renumbered", "  int64 sequence = 2;", "  int64 sequence = 12;"),
        (
            "retyped",
            "  int64 amount = 6;\n  // Asset code, e.g.",
            "  int32 amount = 6;\n  // Asset code, e.g.",
        ),
        (
            "removed",
            "  bool replayed = 2;\n  // The totals of every account",
            "  // The totals of every account",
        ),
    ],
)
def test_a_breaking_change_fails_the_guard(tmp_path: Path, change: str, old: str, new: str) -> None:
    result = breaking(tmp_path, old, new)
    assert result.returncode != 0, change
    assert "ledger.proto" in result.stdout + result.stderr


def test_an_added_field_passes_the_guard(tmp_path: Path) -> None:
    result = breaking(
        tmp_path,
        "  int64 through_sequence = 5;\n}",
        "  int64 through_sequence = 5;\n  // Added later.\n  string note = 6;\n}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
