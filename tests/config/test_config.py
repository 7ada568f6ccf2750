"""Run configs (lightning_distill/config/): the experiment files load, unknown keys and wrong values are named with
the valid ones, ``extends``, choices beside their fields, a checkpoint's config checked as a file is."""

import os

import pytest

from lightning_distill.config import ConfigError, load_config

from conftest import REPO

TEACHER = os.path.join(REPO, "experiments/teacher.yaml")
STUDENT = os.path.join(REPO, "experiments/student.yaml")
BASELINE = os.path.join(REPO, "experiments/baseline.yaml")


@pytest.mark.parametrize("path", [TEACHER, STUDENT, BASELINE])
def test_experiment_configs_load(path):
    cfg = load_config(path)
    assert cfg.stage in ("teacher", "student")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(STUDENT, ["data.train_fracton=0.5"])
    msg = str(e.value)
    assert "data.train_fracton" in msg and "data.train_fraction" in msg and "batch_size" in msg
    with pytest.raises(ConfigError, match="distill.weight"):
        load_config(STUDENT, ["distil.weight=0"])
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config(STUDENT, ["trainer.max_step=3"])


def test_unknown_key_in_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("stage: student\ndata:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*data.batchsize.*data.batch_size"):
        load_config(p)


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(STUDENT, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="stage"):
        load_config(STUDENT, ["stage=teachr"])


def test_extends_merges_base_file_and_reports_errors_in_the_right_file(tmp_path):
    cfg = load_config(BASELINE)
    student = load_config(STUDENT)
    assert cfg.distill.weight == 0 and cfg.distill.prototypes is None and cfg.output_dir == "runs/baseline"
    assert cfg.data == student.data and cfg.model == student.model  # everything else from student.yaml
    (tmp_path / "base.yaml").write_text("data:\n  batchsize: 3\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"base.yaml.*data.batchsize"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


# ------------------------------------------------------------------ one loader, choices beside their fields (issue 34)
def test_every_choice_default_is_one_of_its_choices_at_every_depth():
    from omegaconf import OmegaConf

    from lightning_distill.config import BankBuildConfig, RunConfig, TeachConfig, choices_of

    for schema in (RunConfig, BankBuildConfig, TeachConfig):
        cfg = OmegaConf.structured(schema)
        for key, options in choices_of(schema).items():
            allowed = options() if callable(options) else options
            assert OmegaConf.select(cfg, key) in allowed, (schema.__name__, key)
    run = choices_of(RunConfig)
    # the nested data section of CMEDL's second modality gets the data section's choices without a second table
    assert run["cmedl.target.nifti.unmapped"] == run["data.nifti.unmapped"] and "distill.method" in run
    assert choices_of(TeachConfig)["data.phantom.version"] == run["data.phantom.version"]


def test_a_checkpoints_config_dict_gets_the_same_checks_as_a_file(tmp_path):
    from lightning_distill.config import load_config_dict, to_dict

    good = to_dict(load_config(None, []))
    assert load_config_dict(good).distill.method == "prototype"
    bad = {**good, "distill": {**good["distill"], "geometry": "cosine"}}
    with pytest.raises(ConfigError, match=r"ckpt: distill.geometry='cosine' is not one of \['prob', 'logprob', 'offdiag'\]"):
        load_config_dict(bad, where="ckpt")
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        load_config_dict({**good, "trainer": {"max_stepz": 3}}, where="ckpt")


def test_one_rule_says_which_run_is_a_baseline_and_what_a_report_calls_each_run():
    from omegaconf import OmegaConf

    from lightning_distill.config import is_baseline, run_label

    def label(*overrides):
        cfg = load_config(STUDENT, list(overrides))
        return is_baseline(cfg), run_label(cfg)

    assert label("distill.weight=0", "distill.prototypes=null") == (True, "baseline")
    assert label("distill.prototypes=bank.pt") == (False, "distilled")
    assert label("distill.method=sikd", "distill.teacher=t.ckpt", "distill.weight=2") == (False, "sikd")  # a report once called it baseline
    assert label("distill.method=sikd", "distill.weight=0") == (True, "baseline")
    assert label("distill.method=cmedl", "distill.weight=0") == (False, "cmedl")  # its translator and teacher still train
    assert label("distill.weight=0", "transfer.slices=s") == (False, "transfer")
    assert label("distill.weight=0", "transfer.union=s", "loss.class_balance=inverse_frequency") == (True, "balanced baseline+union")
    assert label("stage=teacher") == (False, "teacher")
    old = OmegaConf.create({"stage": "student", "distill": {"weight": 0.0}})  # a config of an older version lacks keys
    assert is_baseline(old) and run_label(old) == "baseline"


def test_keys_two_schemas_share_are_defined_once():
    """bank build's preprocessing and data keys take data.nifti's defaults and choices (``same_as``); a changed
    default in NiftiConfig reaches them. The phantom's DomainShift is ShiftConfig's fields, not a copy."""
    import dataclasses

    from lightning_distill.config import BankPreprocessConfig, NiftiConfig, ShiftConfig
    from lightning_distill.config.commands import BankDataSpec
    from lightning_distill.config.load import choices_of, same_as
    from lightning_distill.data.sources import DomainShift

    nifti = {f.name: f for f in dataclasses.fields(NiftiConfig)}
    default = lambda f: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # noqa: E731
    shared = {"BankPreprocessConfig": BankPreprocessConfig, "BankDataSpec": BankDataSpec}
    for name, schema in shared.items():
        own = {"from_checkpoint", "labels", "unmapped", "root", "preprocess"}  # bank build's own keys (unmapped: default error)
        for f in dataclasses.fields(schema):
            if f.name in own:
                continue
            assert f.name in nifti, f"{name}.{f.name} is not a data.nifti key"
            assert f.type == nifti[f.name].type and default(f) == default(nifti[f.name]), f"{name}.{f.name} differs from data.nifti's"
            assert f.metadata == nifti[f.name].metadata, f"{name}.{f.name}: other choices than data.nifti's"
    assert choices_of(BankPreprocessConfig)["modality"] == choices_of(NiftiConfig)["modality"]
    with pytest.raises(KeyError, match="no field 'modalty'"):
        same_as(NiftiConfig, "modalty")
    assert [f.name for f in dataclasses.fields(DomainShift)] == [f.name for f in dataclasses.fields(ShiftConfig)]
    assert issubclass(DomainShift, ShiftConfig) and DomainShift().identity and not DomainShift(gamma=2.0).identity
    with pytest.raises(ValueError, match="invalid domain shift"):
        DomainShift(contrast=0.0)


def test_help_shows_a_base_schemas_comment_for_an_inherited_key():
    from lightning_distill.config import TeachConfig
    from lightning_distill.config.load import schema_help

    lines = {ln.split(" = ")[0].strip(): ln for ln in schema_help(TeachConfig)}
    assert "# keep only these case ids" in lines["data.cases"]  # declared in BankDataSpec, inherited by TeachDataSpec
    assert "(one of: nifti, phantom)" in lines["data.source"]  # TeachDataSpec's own key
