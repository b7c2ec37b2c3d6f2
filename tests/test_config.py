"""Every argument form a researcher or `wandb agent` uses gives the same typed config."""

import pytest

from superweight.arguments import parse_config
from superweight.config import ConfigError, RunConfig
from superweight.run.validation import validate

CANONICAL = ("model=/m metric=grad_x_weight topk=100 mode=global perturb=sign_flip perturb.scale=1.0 "
             "controls=random_k,bottom_k seeds=0,1,2 out_dir=outputs/x").split()


def _expected() -> RunConfig:
    cfg = RunConfig()
    cfg.model.name = "/m"
    cfg.score.metrics = ["grad_x_weight"]
    cfg.select.topk = [100]
    cfg.select.modes = ["global"]
    cfg.perturb.names = ["sign_flip"]
    cfg.perturb.scale = 1.0
    cfg.select.controls = ["random_k", "bottom_k"]
    cfg.seeds = [0, 1, 2]
    cfg.out_dir = "outputs/x"
    return cfg


FORMS = {
    "key=value (the seed's canonical command)": CANONICAL,
    "--key value": ("--model /m --metric grad_x_weight --topk 100 --mode global --perturb sign_flip "
                    "--perturb.scale 1.0 --controls random_k bottom_k --seeds 0 1 2 --out_dir outputs/x").split(),
    "--key=value with a,b lists": ["--model=/m", "--metric=grad_x_weight", "--topk=100", "--mode=global",
                                   "--perturb=sign_flip", "--perturb.scale=1.0", "--controls=random_k,bottom_k",
                                   "--seeds=0,1,2", "--out_dir=outputs/x"],
    "wandb agent: dotted names and list reprs": ["--model.name=/m", "--score.metrics=['grad_x_weight']",
                                                 "--select.topk=[100]", "--select.modes=['global']",
                                                 "--perturb.names=sign_flip", "--perturb.scale=1.0",
                                                 "--select.controls=['random_k', 'bottom_k']", "--seeds=[0, 1, 2]",
                                                 "--out_dir=outputs/x"],
    "mixed": ["model=/m", "--metric", "grad_x_weight", "topk=[100]", "--mode=global", "perturb=sign_flip",
              "--perturb.scale", "1", "controls=['random_k','bottom_k']", "seeds=0", "1", "2", "--out_dir=outputs/x"],
}


@pytest.mark.parametrize("form", [
    f for f in FORMS])
def test_all_forms_give_the_same_config(form):
    assert parse_config(FORMS[form]) == _expected()


def test_yaml_file_with_cli_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(
        "model: /m\nmetric: grad_x_weight\ntopk: [1, 100]\nmode: global\n"
        "perturb:\n  names: [sign_flip]\n  scale: 1.0\n"
        "select:\n  controls: [random_k, bottom_k]\nseeds: [0, 1, 2]\nout_dir: outputs/y\n"
    )
    cfg = parse_config([f"config={p}", "topk=100", "out_dir=outputs/x"])
    assert cfg == _expected()
    # without overrides the file's values stand
    assert parse_config(["--config", str(p)]).select.topk == [1, 100]


def test_k_grid_and_types():
    cfg = parse_config(["topk=1,10,100,1000", "perturb.prob=0.5", "model.gradient_checkpointing=true",
                        "data.stride=None", "wandb.tags=a,b"])
    assert cfg.select.topk == [1, 10, 100, 1000]
    assert cfg.perturb.prob == 0.5 and cfg.model.gradient_checkpointing is True
    assert cfg.data.stride is None and cfg.wandb.tags == ["a", "b"]
    assert parse_config(["--model.gradient_checkpointing"]).model.gradient_checkpointing is True


def test_defaults_validate():
    validate(parse_config([]))


@pytest.mark.parametrize("argv, needle", [
    (["metric=nope"], "unknown metric 'nope'"),
    (["mode=sideways"], "unknown mode 'sideways'"),
    (["controls=top_k"], "unknown control 'top_k'"),
    (["perturb=melt"], "unknown perturbation 'melt'"),
    (["topk=0"], "topk must be > 0"),
    (["topk=ten"], "invalid int value: 'ten'"),
    (["perturb.prob=1.5"], "perturb.prob must be in [0, 1]"),
    (["perturb.scale=-1"], "perturb.scale must be >= 0"),
    (["bogus=1"], "unknown option 'bogus'"),
    (["metrc=magnitude"], "did you mean metric"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_values_are_one_line_config_errors(argv, needle):
    with pytest.raises(ConfigError) as e:
        validate(parse_config(argv))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
