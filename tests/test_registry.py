"""The loss registry: recipes, their checks and the distiller all follow it, so one registration adds a loss."""

import pytest
import torch

from detkd.adapters.ultralytics import UltralyticsAdapter
from detkd.config import load_recipe
from detkd.distiller import Distiller
from detkd.errors import DetkdError
from detkd.losses import FGDLoss, MGDLoss, score_weighted_l2
from detkd.losses.registry import FEATURE_LOSSES, Param, register_feature_loss
from detkd.ultralytics_internals import ultralytics_offline

ultralytics_offline()
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

NAMES = {0: "car", 1: "person"}


def _model(cfg: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(cfg, nc=len(NAMES), verbose=False)
    m.names = dict(NAMES)
    return m


def test_entries_say_what_each_shipped_loss_takes():
    assert set(FEATURE_LOSSES) >= {"fitnet", "cwd", "pkd", "mgd", "fgd", "sl2"}
    assert FEATURE_LOSSES["cwd"].params == {"tau": Param(float, 1.0)}  # from the signature, with its default
    assert FEATURE_LOSSES["fitnet"].params == {} and not FEATURE_LOSSES["fitnet"].learned
    assert FEATURE_LOSSES["fgd"].definition is FGDLoss and FEATURE_LOSSES["fgd"].learned
    assert FEATURE_LOSSES["fgd"].inputs == ("gt_boxes", "image_size")
    assert FEATURE_LOSSES["fgd"].params["lambda_"] == Param(float, 5e-6)
    assert FEATURE_LOSSES["mgd"].definition is MGDLoss and set(FEATURE_LOSSES["mgd"].params) == {"alpha", "lambda_mask"}
    assert FEATURE_LOSSES["sl2"].definition is score_weighted_l2 and FEATURE_LOSSES["sl2"].inputs == ("teacher_scores",)
    assert FEATURE_LOSSES["pkd"].connector_at_equal_channels is False


def test_a_registered_loss_is_usable_from_a_recipe_with_no_other_change(toy_feature_loss, tmp_path):
    path = tmp_path / "toy.yaml"
    toy = f"{{loss: {toy_feature_loss}, weight: 2, levels: [0, 1], params: {{scale: 3}}}}"
    path.write_text(f"distill:\n  feature:\n    - {toy}\n")
    recipe = load_recipe(path)  # the schema knows the name
    assert recipe.distill.feature[0].params == {"scale": 3.0}
    with pytest.raises(
        DetkdError, match=r"'distill.feature\[0\].params.scal' is not a parameter of toy \(parameters: scale\)"
    ):
        load_recipe(path, ["distill.feature.loss=toy", "distill.feature.params.scal=3"])
    with pytest.raises(DetkdError, match=r"'distill.feature\[0\].params.scale' must be float, got 'big'"):
        load_recipe(path, ["distill.feature.loss=toy", "distill.feature.params.scale=big"])

    student, teacher = _model("yolov8n.yaml", 0), _model("yolov8s.yaml", 1).eval()
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    distiller = Distiller(recipe.distill, s, t)
    assert distiller.term_names == ["kd_toy"]  # the results column: train/kd_toy (tests/test_train.py trains one)
    connectors = distiller.feature_parts[0]
    assert [type(m[0]).__name__ for m in connectors.values()] == ["Conv2d", "Conv2d"]  # the recipe's default conv_bn

    images = torch.rand(2, 3, 64, 64)
    view_s, view_t = s.view(student.train()(images)), t(images)
    terms = distiller(view_s, view_t, {"img": images})
    expected = 2 * sum(3 * (connectors[str(i)](view_s.feats[i]) - view_t.feats[i]).abs().mean() for i in (0, 1))
    torch.testing.assert_close(terms["kd_toy"], expected)


def test_registration_refuses_what_the_distiller_could_not_call():
    with pytest.raises(ValueError, match="'cwd' is already registered"):
        register_feature_loss("cwd")(lambda student, teacher: student)
    with pytest.raises(TypeError, match="'boxes' is neither an input"):
        register_feature_loss("needs_boxes")(lambda student, teacher, boxes: student)
    with pytest.raises(TypeError, match="a module aligns channels itself"):
        register_feature_loss("mgd2", connector_at_equal_channels=False)(MGDLoss)
    assert not {"needs_boxes", "mgd2"} & set(FEATURE_LOSSES)


def test_a_loss_missing_from_the_registry_is_a_one_line_error():
    from detkd.config import DistillConfig, FeatureLossConfig

    s = UltralyticsAdapter(_model("yolov8n.yaml", 0))
    with pytest.raises(DetkdError, match="unknown feature loss 'nope'"):
        Distiller(DistillConfig(feature=[FeatureLossConfig(loss="nope")]), s, s)
