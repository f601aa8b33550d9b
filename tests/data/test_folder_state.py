"""The held job parameter behind the data jobs' rerun decisions."""

import json

from siad.data.folder_state import STATE_KEY, held_param, hold_param


def test_a_held_parameter_stays_while_the_observation_holds_and_changes_when_it_does_not(tmp_path):
    record = tmp_path / "dataset.json"
    record.write_text(json.dumps({"name": "mvtec"}))
    first = held_param(record, "absent")  # no state yet: the plan-time value of a first run
    hold_param(record, first, "listing-1")  # the job wrote the folder
    assert json.loads(record.read_text())["name"] == "mvtec"  # merged, not overwritten
    assert held_param(record, "listing-1") == first  # as the job left it: no rerun
    edited = held_param(record, "listing-2")
    assert edited != first
    assert held_param(record, "absent") != first  # back to the plan-time observation still reruns
    hold_param(record, edited, "listing-2")
    assert json.loads(record.read_text())[STATE_KEY] == {"param": edited, "observed": "listing-2"}
    assert held_param(tmp_path / "missing.json", "x") != held_param(tmp_path / "missing.json", "y")
