from pathlib import Path

import pytest

from ldmkit.config import Config, from_dict, load_config, to_yaml
from ldmkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_experiment_loads_with_guide_key_names():
    cfg = load_config(ROOT / "configs" / "digits.yaml")
    assert cfg.data.source == "digits" and cfg.data.image_size == 32
    assert cfg.diffusion.latent_scale_factor is None
    assert cfg.train.log_every > 0 and cfg.train.grad_clip > 0


def test_mnist_experiment_reads_the_shared_idx_files_with_the_same_model_as_the_demo():
    mnist, digits = (load_config(ROOT / "configs" / f"{n}.yaml") for n in ("mnist", "digits"))
    assert mnist.data.source == "idx" and mnist.data.path == "../shared/data/mnist"
    assert mnist.model == digits.model and mnist.autoencoder.channel_mult == digits.autoencoder.channel_mult


def test_class_conditional_mnist_is_mnist_with_labels():
    mnist, cond = (load_config(ROOT / "configs" / f"{n}.yaml") for n in ("mnist", "mnist-cond"))
    assert cond.model.num_classes == 10 and cond.train.cond_drop_prob == 0.1
    assert {**vars(cond.model), "num_classes": None} == vars(mnist.model)
    assert cond.data == mnist.data and cond.autoencoder == mnist.autoencoder


def test_the_emoji_config_conditions_on_every_class_folder_of_the_shared_set():
    cfg = load_config(ROOT / "configs" / "emoji.yaml")
    images = ROOT / cfg.data.path
    if not images.is_dir():
        pytest.skip(f"{images} is not here (../shared/data beside the repository)")
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    assert cfg.model.num_classes == len(classes) == 8 and cfg.data.channels == 3
    assert cfg.data.source == "folder" and cfg.data.image_size == 64
    assert cfg.train.cond_drop_prob > 0  # guidance needs the null class


def test_overrides_are_typed_and_yaml_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    cfg = load_config(path, ["train.steps=7", "diffusion.latent_scale_factor=0.5",
                             "model.channel_mult=[1, 2]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.steps == 7
    assert cfg.diffusion.latent_scale_factor == 0.5


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=0.1", "unknown config key 'train.lrr'"),
    ("trian.lr=0.1", "unknown config key 'trian'"),
    ("train.log_every=often", "config key 'train.log_every' must be int"),
    ("train.steps=2.5", "config key 'train.steps' must be int"),
    ("diffusion.t_sampling=gaussian", "one of 'uniform', 'logit_normal'"),
    ("train.lr=-1", "config key 'train.lr' must be > 0.0"),
    ("train.grad_clip=0", "config key 'train.grad_clip' must be > 0.0"),
    ("train.log_every=0", "config key 'train.log_every' must be >= 1"),
    ("train.ema_decay=1.5", "config key 'train.ema_decay' must be >= 0.0 and <= 1.0"),
    ("data=3", "config key 'data' must be a mapping"),
    ("tensorboard=yes please", "config key 'tensorboard' must be bool"),
])
def test_bad_keys_and_values_are_named(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match="allowed keys in train: steps, batch_size"):
        load_config(None, ["train.lrr=0.1"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="needs data.path"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["data.image_size=30"])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["diffusion.latent_scale_factor=0.123456789012345"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert load_config(None) == Config()


def test_flow_goes_with_the_linear_path_only():
    assert from_dict({"diffusion": {"objective": "flow", "schedule": "linear"}})
    for objective, schedule in (("flow", "cosine"), ("eps", "linear"), ("v", "linear")):
        with pytest.raises(ConfigError, match="does not go with diffusion.schedule"):
            from_dict({"diffusion": {"objective": objective, "schedule": schedule}})
