import pytest

from detkd.config import CONFIGS_DIR, builtin_names, load_recipe, parse_overrides
from detkd.errors import DetkdError


def test_built_in_recipes_load_by_name_and_by_path():
    assert builtin_names() == ["recommended", "ultralytics_builtin"]
    for name in builtin_names():
        recipe = load_recipe(name, ["teacher=t.pt", "epochs=3", "distill.logit.weight=0.5"])
        assert recipe.teacher == "t.pt" and recipe.train["epochs"] == 3 and recipe.distill.logit.weight == 0.5
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
    assert text.startswith(message) and text.endswith("(built-in recipes: recommended, ultralytics_builtin)")
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
