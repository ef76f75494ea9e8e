import pytest

from fmfast.errors import FmfastError
from fmfast.engine.settings import DEFAULTS, from_reference_cfg, load_yaml, merge, model_config, parse_override, validate


def test_dotted_override_parses_yaml_values():
    assert parse_override("model.depth=4") == {"model": {"depth": 4}}
    assert parse_override("schedule.steps=[5, 9]") == {"schedule": {"steps": [5, 9]}}
    assert parse_override("optim.lr=1e-3")["optim"]["lr"] == pytest.approx(1e-3)


def test_merge_rejects_unknown_keys_with_their_path():
    with pytest.raises(FmfastError, match="model.dpeth"):
        merge(DEFAULTS, parse_override("model.dpeth=4"))


def test_own_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  depth: 2\ntrain:\n  batch_size: 7\n")
    s = validate(merge(merge(DEFAULTS, load_yaml(f)), parse_override("model.depth=3")))
    assert s["model"]["depth"] == 3 and s["train"]["batch_size"] == 7
    assert DEFAULTS["model"]["depth"] == 6  # defaults untouched


REFERENCE_YAML = """\
TRAIN:
  DATASET: fmf_vicu
  BATCH_SIZE: 64
DATA:
  PATH_TO_DATA_DIR: './data/FMFBenchmarkV2/pixel-level'
  NUM_FRAMES: 10
  SAMPLING_RATE: 18
  IMAGE_SIZE: 64
  CURRENT_SECONDS: 120
  CURRENT_PATCH_DIMS: 3
SOLVER:
  BASE_LR: 0.0005
  LR_POLICY: step
  COSINE_END_LR: 0.
  STEPS: [20]
  MAX_EPOCH: 30
MODEL:
  MODEL_NAME: vit_for_video
  NUM_CLASSES: 2
  IMAGE_PATCH_SIZE: 8
  FRAME_PATCH_SIZE: 2
  ADDITIONAL_TOKENS: True
TEST:
  BATCH_SIZE: 32
TASK: segmentation
"""


def test_reference_yaml_is_translated(tmp_path):
    f = tmp_path / "CfgForVideo.yaml"
    f.write_text(REFERENCE_YAML)
    s = validate(merge(DEFAULTS, load_yaml(f)))
    assert s["data"]["root"] == "./data/FMFBenchmarkV2/pixel-level"
    assert s["data"]["stride"] == 18 and s["data"]["num_frames"] == 10 and s["data"]["current_seconds"] == 120
    assert s["optim"]["lr"] == pytest.approx(5e-4)
    assert s["schedule"]["name"] == "step" and s["schedule"]["steps"] == [20]
    assert s["train"]["epochs"] == 30 and s["train"]["batch_size"] == 64 and s["train"]["eval_batch_size"] == 32
    assert s["model"]["name"] == "video" and s["model"]["task"] == "segmentation" and s["model"]["dilated_tokens"] is True
    cfg = model_config(s, (64, 64))
    assert cfg.num_frames == 10 and cfg.current_len == 240 and cfg.task == "segmentation"


def test_reference_yaml_unknown_model_name():
    with pytest.raises(FmfastError, match="MODEL_NAME"):
        from_reference_cfg({"MODEL": {"MODEL_NAME": "slowfast"}})


@pytest.mark.parametrize("override, message", [
    ("optim.name=rmsprop", "optim.name"),
    ("train.epochs=0", "train.epochs"),
    ("model.task=detection", "model.task"),
    ("train.amp=fp8", "train.amp"),
])
def test_bad_values_name_the_setting(override, message):
    with pytest.raises(FmfastError, match=message):
        validate(merge(DEFAULTS, parse_override(override)))


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(FmfastError, match="bad.yaml"):
        load_yaml(f)
    with pytest.raises(FmfastError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
