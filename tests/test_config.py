import pytest

from bavq.config import ConfigError, from_dict, load_config, save_config, to_dict

BASE = ["train.max_steps=3"]


@pytest.mark.parametrize("override, key", [
    ("quantizer.num_codes=1", "quantizer.num_codes"),
    ("quantizer.decay=1.0", "quantizer.decay"),
    ("quantizer.decay=-0.1", "quantizer.decay"),
    ("quantizer.chunk_size=0", "quantizer.chunk_size"),
    ("quantizer.name=pq", "quantizer.name"),
    ("quantizer.init=kmeans", "quantizer.init"),
    ("quantizer.prior_floor=0", "quantizer.prior_floor"),
    ("quantizer.assign=soft", "quantizer.assign"),
    ("quantizer.beta_mode=cosine", "quantizer.beta_mode"),
    ("quantizer.anneal_start_nats=0", "quantizer.anneal_start_nats"),
    ("quantizer.anneal_end_nats=0.5", "quantizer.anneal_end_nats"),
    ("quantizer.anneal_rate=1.5", "quantizer.anneal_rate"),
    ("quantizer.anneal_rate=0", "quantizer.anneal_rate"),
    ("quantizer.estep=hard", "quantizer.estep"),
    ("quantizer.balance_iters=0", "quantizer.balance_iters"),
    ("quantizer.balance_iters=-1 quantizer.balance_warm_start=true", "quantizer.balance_iters"),
    ("quantizer.dead_code_relative=true quantizer.dead_code_threshold=1.5", "quantizer.dead_code_threshold"),
    ("quantizer.balance_beta_scale=true", "quantizer.balance_beta_scale"),
    ("quantizer.balance_warm_start=true quantizer.estep=softmax", "quantizer.balance_warm_start"),
    ("quantizer.balance_target=zipf", "quantizer.balance_target"),
    ("quantizer.restart_counts=argmin", "quantizer.restart_counts"),
    ("quantizer.num_codes=abc", "quantizer.num_codes"),
    ("quantizer.no_such_key=1", "quantizer.no_such_key"),
    ("model.arch=resnet", "model.arch"),
    ("data.source=imagenet", "data.source"),
    ("data.image_size=2", "data.image_size"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.backend=fsdp", "train.backend"),
    ("loss.perceptual_weight=1.0", "loss.lpips_weights"),
])
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, BASE + override.split())  # one or more key=value
    message = str(info.value)
    assert key in message and "\n" not in message


def test_unknown_section_and_malformed_override():
    with pytest.raises(ConfigError, match="nosection"):
        load_config(None, BASE + ["nosection.x=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, BASE + ["quantizer.num_codes"])


def test_needs_a_length():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, [])


def test_yaml_file_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("quantizer:\n  name: ba_vq\n  num_codes: 64\ntrain:\n  max_steps: 5\n")
    cfg = load_config(path, ["quantizer.entropy_weight=2.0"])
    assert cfg.quantizer.name == "ba_vq" and cfg.quantizer.num_codes == 64
    assert cfg.quantizer.entropy_weight == 2.0 and cfg.train.max_steps == 5
    save_config(cfg, tmp_path / "resolved.yaml")
    assert to_dict(load_config(tmp_path / "resolved.yaml")) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantizer: [unclosed\n")
    with pytest.raises(ConfigError):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_every_field_is_documented_in_the_readme():
    from pathlib import Path

    from bavq.config import field_docs

    docs = field_docs()
    assert len(docs) > 80
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key, (_default, doc) in docs.items():
        assert doc, f"{key} has no one-line doc comment in bavq/config.py"
        assert f"`{key}`" in readme, f"{key} is missing from the README's configuration reference"


def test_mixed_precision_no_on_the_command_line_means_no():
    """YAML 1.1 reads a bare `no` as false; the key's own value "no" must still be accepted."""
    assert load_config(None, ["train.max_steps=1", "train.mixed_precision=no"]).train.mixed_precision == "no"


def test_saved_configs_with_a_retired_key_keep_loading(tmp_path):
    """Run folders saved before loss.disc_loss was removed still load (resume, eval, from_pretrained);
    a value other than the only one it could hold is an error naming the key."""
    current = load_config(None, ["train.max_steps=5"])
    old = to_dict(current)
    old["loss"]["disc_loss"] = "hinge"
    assert from_dict(old) == current
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  max_steps: 5\nloss:\n  disc_loss: hinge\n")
    assert load_config(path) == current
    path.write_text("train:\n  max_steps: 5\nloss:\n  disc_loss: vanilla\n")
    with pytest.raises(ConfigError, match=r"loss\.disc_loss.*removed"):
        load_config(path)
    with pytest.raises(ConfigError, match="disc_loss"):
        load_config(None, ["loss.disc_loss=hinge"])  # a new command line must not set it
