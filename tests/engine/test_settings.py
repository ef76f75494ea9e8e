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


@pytest.mark.parametrize("override, says", [
    ("model.dim=abc", "expected an integer"),
    ("model.heads=0", "must be >= 1"),
    ("model.depth=-1", "must be >= 1"),
    ("train.seed=nan", "expected an integer"),
    ("train.seed=-3", "must be >= 0"),
    ("train.eval_batch_size=0", "must be >= 1"),
    ("optim.lr=inf", "finite number"),
    ("optim.lr=0", "must be > 0"),
    ("optim.weight_decay=-0.1", "must be >= 0"),
    ("data.val_fraction=1", "below 1"),
    ("data.val_fraction=-0.1", "must be >= 0"),
    ("model.dilated_tokens=3", "true or false"),
    ("model.seg_hidden_dims=[16,0,8]", "must be >= 1"),
    ("model.pool=3", "expected a string"),
    ("train.patience=1.5", "expected an integer"),
    ("train.monitor=val/loss", "val/f1"),
    ("train.monitor=f1", "val/"),
])
def test_every_setting_is_checked_against_its_default(override, says):
    with pytest.raises(FmfastError) as e:
        validate(merge(DEFAULTS, parse_override(override)))
    name = override.split("=")[0]
    assert name in str(e.value) and says in str(e.value), str(e.value)


def test_good_values_pass_and_monitor_resolves_per_task():
    from fmfast.engine.selection import resolve_monitor

    s = validate(merge(DEFAULTS, {"optim": {"lr": 1}, "train": {"seed": 0, "patience": 2}, "data": {"val_fraction": 0.0}}))
    assert resolve_monitor(s) == "val/f1"
    seg = validate(merge(DEFAULTS, {"model": {"task": "segmentation"}, "train": {"monitor": "val/aupro"}}))
    assert resolve_monitor(seg) == "val/aupro"
    assert resolve_monitor(merge(seg, {"train": {"monitor": "auto"}})) == "val/miou"


def test_selection_follows_the_monitor_and_stops_after_patience():
    from fmfast.engine.selection import Selection

    sel = Selection("val/f1", patience=2, has_val=True)
    seq = [0.5, 0.7, float("nan"), 0.6, 0.9]
    improved = [sel.update(e, {"f1": v, "calibration": {"threshold": e / 10}}) for e, v in enumerate(seq[:4], 1)]
    assert improved == [True, True, False, False] and sel.stopped
    assert (sel.epoch, sel.value, sel.threshold) == (2, 0.7, 0.2)
    low = Selection("val/fdr", patience=0, has_val=True)
    assert [low.update(e, {"fdr": v}) for e, v in enumerate([0.3, 0.1, 0.2], 1)] == [True, True, False]
    assert not low.stopped  # patience 0: never stops
    none = Selection("val/f1", patience=0, has_val=False)
    assert none.update(1, {}) and none.update(2, {}) and none.record()["epoch"] == 2
