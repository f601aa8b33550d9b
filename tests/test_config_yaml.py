"""siad.yaml_check: a malformed config file is reported as <file>:<line>:<column>: <problem> (Snakemake 9 itself only
says "Config file is not valid JSON or YAML"), and non-finite numbers never reach a run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siad.errors import ConfigError
from siad.yaml_check import check_finite_numbers, load_yaml, main

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_load_as_with_safe_load(name):
    path = ROOT / "config" / name
    config = load_yaml(path)
    assert config == yaml.safe_load(path.read_text())
    check_finite_numbers(config)


@pytest.mark.parametrize(("text", "place", "problem"), [
    ("a: [1\n", ":2:1:", "expected ',' or ']'"),
    ("a:\n\tb: 1\n", ":2:1:", "indent with spaces, not tabs"),
    ("a: 1\n b: 2\n", ":2:3:", "mapping values are not allowed here"),
    ("a: 'open\n", ":2:1:", "found unexpected end of stream"),
])
def test_syntax_errors_name_file_line_and_column(tmp_path, text, place, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"{path}{place} ") and problem in first


def test_a_broken_copy_of_the_paper_config_points_at_the_line(tmp_path):
    lines = (ROOT / "config" / "config.yaml").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith("batch_size:"))
    lines[index] = lines[index].replace("batch_size:", "batch_size: [16", 1)
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}:{index + 2}:\d+: expected ',' or '\]'.*line {index + 1}"):
        load_yaml(path)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = write(tmp_path, "seed: 0\nevaluation:\n  size: 256\n  size: 64\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:3: duplicate key 'size' \(first at line 3\)"):
        load_yaml(path)


def test_merge_keys_may_be_overridden(tmp_path):
    path = write(tmp_path, "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n")
    assert load_yaml(path)["other"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(("text", "place"), [
    ("methods:\n  m:\n    params:\n      lr: .nan\n", ":4:11: lr: .nan"),
    ("a: -.inf\n", ":1:4: a: -.inf"),
    ("a: [1.0, .Inf]\n", ":1:10: .Inf"),
])
def test_non_finite_numbers_are_refused_where_they_are(tmp_path, text, place):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}{place} is not a finite number"):
        load_yaml(path)


@pytest.mark.parametrize(("text", "match"), [
    ("", "is empty"),
    ("- a\n- b\n", ":1:1: the top level must be a mapping"),
])
def test_empty_and_non_mapping_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_yaml(write(tmp_path, text))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'nope.yaml'}: config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_check_finite_numbers_names_the_key():
    with pytest.raises(ConfigError, match=r"^methods\.m\.params\.lr: nan is not a finite number"):
        check_finite_numbers({"methods": {"m": {"params": {"lr": math.nan}}}})
    with pytest.raises(ConfigError, match=r"^evaluation\.thresholds\[1\]: inf"):
        check_finite_numbers({"evaluation": {"thresholds": [0.1, math.inf]}})
    check_finite_numbers({"a": 1.5, "b": "infinite", "c": [1, "x"], "d": None, "e": True})


def test_config_overrides_from_the_command_line():
    # what Snakemake 9 makes of --config: a top-level `lr=nan` is a float NaN (the schema refuses the unknown key),
    # but nested values are parsed as text, so a method parameter arrives as the string '.nan'
    from snakemake.cli import parse_config

    top = parse_config(["seed=nan"])
    assert math.isnan(top["seed"])
    with pytest.raises(ConfigError, match=r"^seed: nan is not a finite number"):
        check_finite_numbers(top)
    nested = parse_config(["methods={anomalygpt: {params: {lr: .nan}}}"])
    assert nested["methods"]["anomalygpt"]["params"]["lr"] == ".nan"
    with pytest.raises(ConfigError, match=r"^methods\.anomalygpt\.params\.lr: '\.nan' is not a finite number"):
        check_finite_numbers(nested)


def test_command_line_checker(tmp_path, capsys):
    good, bad = write(tmp_path, "a: 1\n", "good.yaml"), write(tmp_path, "a: [1\n", "bad.yaml")
    assert main([str(good)]) == 0 and main([str(bad)]) == 1
    assert f"{bad}:2:1:" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "siad.yaml_check", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith(f"{bad}:2:1:")
