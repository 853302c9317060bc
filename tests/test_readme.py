"""The README as a newcomer meets it: every snippet runs as written, and what it states
about installing (the extras, the pip line) and about files matches the repository."""

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REPOSITORY = "https://github.com/layerwise-optax/layerwise_optax"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)


def _snippet_id(code):
    return re.sub(r"\W+", "_", next(line for line in code.splitlines() if line.strip()))[:40]


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("code", [pytest.param(c, id=_snippet_id(c)) for c in SNIPPETS])
def test_snippet_runs_standalone(code, tmp_path):
    # Each snippet alone, in a fresh interpreter, as a reader would paste it. XLA_FLAGS is
    # cleared: a snippet that needs simulated devices must say so itself.
    pytest.importorskip("flax")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def _requirement_names(specs):
    return [re.split(r"[<>=!~\[ ;@]", s, maxsplit=1)[0] for s in specs]


def test_extras_table_lists_every_extra_with_its_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", install, re.M))
    assert set(rows) == set(extras)
    for extra, specs in extras.items():
        assert [p.strip() for p in rows[extra].split(",")] == _requirement_names(specs), extra


def test_pip_lines_name_the_repository():
    for extra in ("", "[zoo]"):
        assert f'pip install "layerwise-optax{extra} @ git+{REPOSITORY}"' in README


def test_no_links_to_files_outside_the_repository():
    # The README once pointed at ../shared/STYLE.md and shared/PAPER.md, which a clone
    # does not have.
    for doc in (
        ROOT / "README.md",
        ROOT / "notebooks" / "README.md",
        ROOT / "benchmarks" / "README.md",
    ):
        text = doc.read_text()
        assert "shared/" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not re.match(r"https?://", target):
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
