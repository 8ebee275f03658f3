"""bench/report_diff.py: two runs' JSON reports compared, timings and paths aside."""

import json

from bench import report_diff


def _write(root, name, value):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_volatile_keys_are_skipped_and_real_differences_found():
    a = dict(n=10, seconds=1.5, checkpoint_path="/a", rows=[dict(x=1.0, elapsed=3)])
    assert report_diff.diff(a, dict(a, seconds=9.0, checkpoint_path="/b")) == []
    changed = dict(a, rows=[dict(x=2.0, elapsed=3)])
    assert report_diff.diff(a, changed) == ["rows[0].x: 1.0 != 2.0"]
    assert report_diff.diff(a, dict(a, n=11)) == ["n: 10 != 11"]
    assert report_diff.diff(dict(k=[1, 2]), dict(k=[1])) == ["k: 2 items != 1"]
    assert report_diff.diff(dict(k=1), dict(j=1)) == ["j: only in after", "k: only in before"]
    assert report_diff.diff(dict(v=1.0), dict(v=1.0 + 1e-9), tol=1e-6) == []


def test_two_run_folders(tmp_path, capsys):
    before, after = tmp_path / "before", tmp_path / "after"
    _write(before, "summary.json", dict(n=3, duration=1))
    _write(after, "summary.json", dict(n=3, duration=2))
    _write(before, "adaptive/batch_000.json", dict(broken=[True, False]))
    _write(after, "adaptive/batch_000.json", dict(broken=[True, False]))
    assert report_diff.main([str(before), str(after)]) == 0
    _write(after, "adaptive/batch_000.json", dict(broken=[True, True]))
    _write(after, "extra.json", {})
    assert report_diff.main([str(before), str(after)]) == 1
    out = capsys.readouterr().out
    assert "adaptive/batch_000.json: broken[1]: False != True" in out
    assert "extra.json: only in" in out
