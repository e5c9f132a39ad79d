import os
import subprocess
import sys
from pathlib import Path

import pytest

import detkd
from detkd.config import CONFIGS_DIR, builtin_names, load_recipe, parse_overrides
from detkd.errors import DetkdError


def test_built_in_recipes_load_by_name_and_by_path():
    assert builtin_names() == ["frcnn", "recommended", "ultralytics_builtin"]
    for name in builtin_names():
        recipe = load_recipe(name, ["teacher=t.pt", "epochs=12", "distill.logit.weight=0.5"])
        assert recipe.teacher == "t.pt" and recipe.train["epochs"] == 12 and recipe.distill.logit.weight == 0.5
        assert load_recipe(name) == load_recipe(CONFIGS_DIR / f"{name}.yaml") and load_recipe(name).distills


def test_a_local_file_wins_over_a_built_in_name(tmp_path, monkeypatch):
    (tmp_path / "recommended").write_text("distill: {logit: {weight: 3.0}}\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe("recommended").distill.logit.weight == 3.0


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("recomended", "recomended: neither a recipe file nor a built-in recipe"),
        ("my/recipe.yaml", "my/recipe.yaml: recipe not found"),
        ("recipe.yaml", "recipe.yaml: recipe not found"),
    ],
)
def test_an_unknown_recipe_is_one_line_listing_the_built_in_names(given, message):
    with pytest.raises(DetkdError) as e:
        load_recipe(given)
    text = str(e.value)
    assert text.startswith(message) and text.endswith("(built-in recipes: frcnn, recommended, ultralytics_builtin)")
    assert "\n" not in text


def test_overrides_parse_yaml_values_and_nest():
    assert parse_overrides(["epochs=3", "lr0=0.01", "distill.box.locations=all", "cache=false"]) == {
        "epochs": 3,
        "lr0": 0.01,
        "distill": {"box": {"locations": "all"}},
        "cache": False,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("distill:\n  feature:\n    - loss: cwd\n      wieght: 1\n", "unknown key 'distill.feature[0].wieght'"),
        ("distill:\n  feature:\n    - loss: kd\n", "'distill.feature[0].loss' must be one of"),
        ("distill:\n  logit:\n    weight: heavy\n", "'distill.logit.weight' must be float"),
        ("distill:\n  schedule: 3\n", "'distill.schedule' must be a mapping"),
        ("teachr: t.pt\n", "unknown key 'teachr'"),
        ("- a\n- b\n", "a recipe must be a mapping"),
        ("distill: [\n", "not valid YAML"),
        # params: the loss's own keyword parameters, of their types
        (
            "distill:\n  feature:\n    - loss: cwd\n      params: {tua: 2}\n",
            "'distill.feature[0].params.tua' is not a parameter of cwd (parameters: tau)",
        ),
        (
            "distill:\n  feature:\n    - loss: fitnet\n      params: {tau: 2}\n",
            "'distill.feature[0].params.tau' is not a parameter of fitnet (parameters: none)",
        ),
        (
            "distill:\n  feature:\n    - loss: mgd\n      params: {lambda_mask: high}\n",
            "'distill.feature[0].params.lambda_mask' must be float, got 'high'",
        ),
        # weights and temperatures: finite, not negative (not zero for a temperature)
        ("distill:\n  logit: {weight: -1}\n", "'distill.logit.weight' must be >= 0, got -1.0"),
        ("distill:\n  box: {weight: .nan}\n", "'distill.box.weight' must be a finite number, got nan"),
        ("distill:\n  feature: {loss: pkd, weight: .inf}\n", "'distill.feature[0].weight' must be a finite number"),
        ("distill:\n  logit: {temperature: 0}\n", "'distill.logit.temperature' must be > 0, got 0.0"),
        # Ultralytics training keys: its own check and message
        ("train:\n  epochz: 3\n", "'epochz' is not a valid YOLO argument. Similar arguments are i.e. ['epochs=100']"),
        ("train:\n  epochs: many\n", "'epochs=many' is of invalid type str. 'epochs' must be an int"),
        ("train:\n  data: d.yaml\n", "'train.data' is set by the recipe's 'data'"),
    ],
)
def test_bad_recipes_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DetkdError, match=r"bad\.yaml") as e:
        load_recipe(path)
    assert message in str(e.value)


def test_a_single_feature_loss_may_be_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("distill:\n  feature: {loss: pkd, weight: 6}\n")
    feature = load_recipe(path).distill.feature
    assert len(feature) == 1 and feature[0].loss == "pkd" and feature[0].weight == 6.0


def test_command_line_overrides_are_checked_like_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student: yolov8n.yaml\n")
    with pytest.raises(DetkdError, match=r"r\.yaml: 'distill\.logit\.weight' must be >= 0, got -1\.0"):
        load_recipe(path, ["distill.logit.weight=-1"])
    with pytest.raises(DetkdError, match=r"r\.yaml: 'epochz' is not a valid YOLO argument"):
        load_recipe(path, ["epochz=3"])


def test_overrides_merge_deeply_whatever_the_recipe_is(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "distill:\n  feature: [{loss: cwd}, {loss: pkd}]\n  logit: {weight: 2.0, temperature: 2.0}\n"
        "  box: {weight: 8.0}\ntrain: {epochs: 30, imgsz: 640}\n"
    )
    overrides = {"distill": {"logit": {"weight": 0.5}, "feature": [{"loss": "fitnet"}]}, "epochs": 3}
    from_path = load_recipe(path, overrides)
    assert from_path == load_recipe(load_recipe(path), overrides)  # a Recipe object merges by the same rule
    assert (from_path.distill.logit.weight, from_path.distill.logit.temperature) == (0.5, 2.0)
    assert from_path.distill.box.weight == 8.0 and from_path.train == {"epochs": 3, "imgsz": 640}
    assert [f.loss for f in from_path.distill.feature] == ["fitnet"]  # a list is replaced whole


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["RECIPE", "epochz=3"], "'epochz' is not a valid YOLO argument. Similar arguments are i.e. ['epochs=100']"),
        (["RECIPE", "distill.logit.weight=.nan"], "'distill.logit.weight' must be a finite number, got nan"),
        (
            ["frcnn", "epochs=10", "teacher=t.pt", "data=d.yaml"],
            "'distill.schedule.stop_last_epochs' (10) leaves none of the 10 epochs distilled: lower it (e.g. "
            "distill.schedule.stop_last_epochs=5)",
        ),
        (
            ["resume=RUN", "teacher=t.pt", "epochs=3"],
            "a resumed run keeps its saved recipe (distill.yaml); given: teacher",
        ),
    ],
)
def test_cli_train_refuses_bad_keys_in_one_line(tmp_path, args, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("student: yolov8n.yaml\ntrain: {epochs: 1}\n")
    args = [a.replace("RECIPE", str(recipe)).replace("RUN", str(tmp_path)) for a in args]
    env = {**os.environ, "PYTHONPATH": str(Path(detkd.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "detkd.cli", "train", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("detkd: error: ")
    assert message in proc.stderr


def test_a_chain_is_refused_with_second_stage_terms_its_yolo_assistants_cannot_teach(tmp_path):
    """The assistants of a chain are YOLO models: the stages after the first have no two-stage teacher."""
    frcnn = {"teacher": "torchvision:fasterrcnn_resnet18_fpn", "teacher_weights": "w.pt", "chain": ["yolov8s.yaml"]}
    with pytest.raises(DetkdError) as refused:
        load_recipe("frcnn", frcnn)
    message = str(refused.value)
    expected = "frcnn.yaml: 'distill.second_stage' needs a two-stage teacher, but the 'chain' assistants (yolov8s.yaml)"
    assert expected in message and "\n" not in message
    no_second_stage = {**frcnn, "distill": {"second_stage": {"cls_weight": 0, "box_weight": 0}}}
    assert load_recipe("frcnn", no_second_stage).chain == ["yolov8s.yaml"]  # without them, a chain loads
    aligned = {**frcnn, "distill": {"second_stage": {"cls_weight": 0, "box_weight": 0, "dense": "aligned"}}}
    with pytest.raises(DetkdError, match="'distill.second_stage' needs a two-stage teacher, but the 'chain'"):
        load_recipe("frcnn", aligned)  # its dense verdict too: no stage after the first has one
    from detkd.engine import distill

    with pytest.raises(DetkdError, match="'distill.second_stage' needs a two-stage teacher"):
        distill("frcnn", data=str(tmp_path / "data.yaml"), **frcnn)  # refused before anything is read or built
