"""The command line: each bad input gives exit 2 and one line naming the culprit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vidtune", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_clear_line(out, *needles):
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("vidtune: error:")]
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("sub", ["data synth", "data index", "preflight", "sweep", "promote", "predict", "report"])
def test_every_subcommand_has_help_with_an_example(sub):
    out = run(*sub.split(), "--help")
    assert out.returncode == 0 and "example:" in out.stdout


def test_malformed_space_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nspace: [unclosed\n")
    assert_one_clear_line(run("sweep", "--space", str(bad), cwd=tmp_path), "broken.yaml", "malformed YAML")


def test_space_with_unknown_key_and_bad_bounds(tmp_path):
    bad = tmp_path / "keys.yaml"
    bad.write_text("name: x\nfixed: {train: {lr: 0.01}}\nspace:\n  train.lr: {type: float, low: 1, high: 0.5}\nbogus: 1\n")
    assert_one_clear_line(run("sweep", "--space", str(bad), cwd=tmp_path), "keys.yaml", "bogus: unknown key", "low (1.0) must be below high")


def test_missing_data_path(tmp_path):
    assert_one_clear_line(run("sweep", "--data", str(tmp_path / "nope"), cwd=tmp_path), "nope: no such file or folder")


def test_unreachable_tracking_server_is_caught_before_trials(tmp_path):
    out = run("sweep", "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path)
    assert_one_clear_line(out, "http://127.0.0.1:9", "unreachable")
    assert not os.path.exists(tmp_path / "data")  # nothing was started


def test_data_index_names_corrupt_files(tiny_set, tmp_path):
    import shutil

    folder = tmp_path / "videos"
    shutil.copytree(os.path.dirname(tiny_set), folder, ignore=shutil.ignore_patterns("*.parquet"))
    victim = folder / "move_up" / "move_up_0000.mp4"
    victim.write_bytes(b"\x00" * 100)
    out = run("data", "index", str(folder), "--out", str(tmp_path / "m.parquet"))
    assert out.returncode == 0, out.stderr
    assert f"left out {victim}" in out.stderr and "(1 left out)" in out.stdout


def test_predict_with_a_folder_that_is_not_a_checkpoint(tmp_path, tiny_set):
    assert_one_clear_line(run("predict", "--model", str(tmp_path), tiny_set), "not a vidtune checkpoint")


def test_promote_unknown_experiment(tmp_path):
    out = run("promote", "--experiment", "ghost", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert_one_clear_line(out, "no experiment named 'ghost'")


def test_preflight_command_reports_each_check_and_exits_nonzero(tiny_set, tmp_path):
    space = tmp_path / "bad_norm.yaml"
    space.write_text(
        "name: bad_norm\nfixed:\n  data: {std: [0.001, 0.001, 0.001], crop_size: 32, decode_short_side: 40, hflip: 0.0}\n"
        "  model: {widths: [8, 16]}\n  train: {lr: 0.005}\nspace:\n  train.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}\n"
    )
    out = run("preflight", "--space", str(space), "--data", tiny_set, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:4]] == ["manifest", "leak", "static", "inputs"]
    assert lines[3].startswith("inputs: FAIL: values far outside a normalised range")
    assert lines[-1] == "preflight: 1 of 4 checks failed"
