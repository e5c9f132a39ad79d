import pytest

from detkd.config import load_recipe, parse_overrides
from detkd.errors import DetkdError


def test_recipes_in_configs_load(tmp_path):
    for name in ("recommended", "ultralytics_builtin"):
        recipe = load_recipe(f"configs/{name}.yaml", ["teacher=t.pt", "epochs=3", "distill.logit.weight=0.5"])
        assert recipe.teacher == "t.pt" and recipe.train["epochs"] == 3 and recipe.distill.logit.weight == 0.5


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
