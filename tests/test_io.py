"""Output files get the usual permissions, and progress bars pick a frontend that renders.

Issue 21 item 8: the zoo's command line wrote its figures and JSON ``0600``
(``tempfile.mkstemp`` then a rename), and ``tqdm.auto`` warned ``TqdmWarning: IProgress
not found`` in a Jupyter kernel without ipywidgets. Both are fixed once in
``layerwise_optax._io``; the source scan below keeps every other writer on it.
"""

import contextlib
import importlib.util
import os
import pathlib
import re
import stat
import sys
import types
import warnings

import pytest

from layerwise_optax import _io

ROOT = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_permissions_of_a_new_file(tmp_path, mask):
    with _umask(mask):
        _io.atomic_write(tmp_path / "out.json", lambda tmp: tmp.write_text("{}"))
        (tmp_path / "plain.json").write_text("{}")
    assert _mode(tmp_path / "out.json") == 0o666 & ~mask == _mode(tmp_path / "plain.json")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "plain.json"]


def test_atomic_write_replaces_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "fig.png"
    _io.atomic_write(target, lambda tmp: tmp.write_bytes(b"1"))
    _io.atomic_write(target, lambda tmp: tmp.write_bytes(b"22"))
    assert target.read_bytes() == b"22"
    assert list(target.parent.iterdir()) == [target]


def test_benchmark_records_and_zoo_figures_are_world_readable(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import harness
    from layerwise_optax.zoo import _cli

    with _umask(0o022):
        record = harness.write_record(tmp_path, "perm", {"a": 1}, {"b": 2})
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure()
        paths = _cli._save_figure(fig, tmp_path / "figs", "f")
        plt.close(fig)
    for p in [record, *paths]:
        assert _mode(p) == 0o644, (p, oct(_mode(p)))


def test_demo_outputs_are_world_readable(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    with _umask(0o022):
        demo._atomic_write(tmp_path / "demo.json", lambda tmp: tmp.write_text("{}"))
    assert _mode(tmp_path / "demo.json") == 0o644


def _python_sources():
    for folder in ("layerwise_optax", "benchmarks", "examples", "notebooks"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_writer_creates_private_temporary_files_or_uses_tqdm_auto():
    # The class of both faults: a file created by mkstemp/NamedTemporaryFile and renamed
    # into place keeps mode 0600; tqdm.auto/autonotebook warn in kernels without widgets.
    bad = re.compile(r"mkstemp\(|NamedTemporaryFile\(|tqdm\.auto|tqdm\.autonotebook")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _python_sources()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if bad.search(line) and p.name != "_io.py"
    ]
    assert not offenders, f"use layerwise_optax._io instead: {offenders}"


def test_progress_bar_outside_a_kernel_is_the_text_bar_and_silent():
    pytest.importorskip("tqdm")
    import tqdm.std

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = _io.progress_bar(total=3, disable=True)
        bar.update(3)
        bar.close()
    assert type(bar) is tqdm.std.tqdm


def _fake_kernel(monkeypatch, *, widgets):
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (object() if widgets else None) if name == "ipywidgets" else real(name, *a)
        ),
    )


@pytest.mark.parametrize("widgets", [False, True])
def test_widget_frontend_only_in_a_kernel_with_ipywidgets(monkeypatch, widgets):
    assert not _io._in_widget_kernel()
    _fake_kernel(monkeypatch, widgets=widgets)
    assert _io._in_widget_kernel() is widgets
    if not widgets:
        pytest.importorskip("tqdm")
        import tqdm.std

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bar = _io.progress_bar(total=1, disable=True)
        assert type(bar) is tqdm.std.tqdm
