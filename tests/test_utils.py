"""The shared plumbing: writes that a crash cannot tear, and the one rule by which class names match."""

import json

import pytest

from detkd.utils import atomic_write, class_key, save_json, write_text


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_debris(tmp_path):
    path = write_text(tmp_path / "run.json", '{"epoch": 1}')

    def half_then_crash(tmp):
        tmp.write_text('{"epo')
        raise KeyboardInterrupt  # a kill arriving mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_writes_create_folders_and_replace_whole_files(tmp_path):
    path = save_json({"a": [1, 2]}, tmp_path / "new" / "deep" / "x.json")
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    write_text(path, "short")
    assert path.read_text() == "short" and sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("traffic light", "traffic_light", True),
        (" Bus ", "bus", True),
        ("stop_sign", "Stop Sign", True),
        ("car", "cars", False),
        ("trafficlight", "traffic light", False),
    ],
)
def test_class_names_match_ignoring_case_spaces_and_underscores(a, b, same):
    assert (class_key(a) == class_key(b)) is same
