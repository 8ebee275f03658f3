"""Tests of report writing: atomic files, non-clobbering output dirs, tables, progress lines."""

import io
import os

import numpy as np
import pytest

from manifold_tf import reporting


def test_write_json_converts_numpy_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "r.json"
    reporting.write_json(str(path), {"a": np.float32(0.5), "b": np.arange(3), "c": float("inf")})
    assert reporting.read_json(str(path)) == {"a": 0.5, "b": [0, 1, 2], "c": "inf"}
    assert os.listdir(tmp_path) == ["r.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    reporting.write_json(str(path), {"old": 1})
    with pytest.raises(TypeError):
        reporting.write_json(str(path), {"new": object()})
    assert reporting.read_json(str(path)) == {"old": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_prepare_output_dir_refuses_to_clobber(tmp_path):
    out = tmp_path / "out"
    reporting.prepare_output_dir(str(out))
    (out / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        reporting.prepare_output_dir(str(out))
    reporting.prepare_output_dir(str(out), resume=True)
    reporting.prepare_output_dir(str(out), overwrite=True)
    assert (out / "mine.txt").read_text() == "x"


def test_markdown_table():
    table = reporting.markdown_table(["a", "b"], [[1, 0.123456], ["x", 2.0]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x | 2 |"]


def test_progress_reports_counts_rate_and_eta():
    stream = io.StringIO()
    progress = reporting.Progress(10, "attack", unit="images", initial=4, stream=stream)
    progress.update(2)
    line = stream.getvalue()
    assert "attack: 6/10 images (60%)" in line and "images/s" in line and "ETA" in line


def test_save_figure_writes_a_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    reporting.save_figure(fig, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
