"""The README's main job, in quick mode: it writes a PNG and a JSON of the curves."""

import json
import runpy

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _main():
    return runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="demo")["main"]


def test_demo_quick_writes_png_and_json(tmp_path):
    _main()(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "demo.json").read_text())
    assert set(record["results"]) == {"adamw", "shampoo", "soap"}
    for r in record["results"].values():
        assert len(r["loss_curve"]) == record["settings"]["steps"] + 1
        assert r["final_loss"] < r["loss_curve"][0]
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name not in ("demo.json", "demo.png")]


def test_demo_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _main()(["--steps", "0", "--out", str(tmp_path)])
    assert e.value.code != 0
    assert "must be >= 1" in capsys.readouterr().err
