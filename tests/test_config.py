"""Strict configs: every experiment file loads and builds; clear errors for bad input."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ace_lightning import registry
from ace_lightning.config import EXPERIMENTS_DIR, RunCfg, load_config, presets
from ace_lightning.registry import ConfigError

DOG = "concepts=[{concept: dog, kind: object, neutral: animal}]"


def test_base_yaml_has_every_schema_key_with_a_comment():
    schema = OmegaConf.to_container(OmegaConf.structured(RunCfg))
    base = OmegaConf.to_container(OmegaConf.load(EXPERIMENTS_DIR / "base.yaml"))

    def keys(d, pre=""):
        out = set()
        for k, v in d.items():
            out.add(pre + k)
            if isinstance(v, dict) and k != "timesteps":
                out |= keys(v, pre + k + ".")
        return out

    assert keys(schema) == keys(base)
    for line in (EXPERIMENTS_DIR / "base.yaml").read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"uncommented key: {line}"


def test_every_experiment_file_loads_and_builds():
    files = [p for p in EXPERIMENTS_DIR.rglob("*.yaml") if p.parent.name not in ("concepts", "sweeps") and p.name != "base.yaml"]
    for p in files:
        rel = p.relative_to(EXPERIMENTS_DIR).with_suffix("")
        cfg = load_config([DOG, f"experiment={rel}"])
        registry.build("timesteps", cfg.data.timesteps)
    for name in presets():
        cfg = load_config([f"concept={name}"])
        assert cfg.concepts and cfg.concepts[0].concept
        registry.lookup("token_policy", cfg.data.token_policy)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key.*lr_gate"):
        load_config([DOG, "optim.lrr=3"])
    with pytest.raises(ConfigError, match=r"valid keys.*trainer"):
        load_config([DOG, "trainr.max_steps=3"])


def test_registry_unknown_name_and_key():
    with pytest.raises(ConfigError, match="valid: band, uniform"):
        registry.build("timesteps", {"name": "gaussian"})
    with pytest.raises(ConfigError, match="valid keys"):
        registry.build("timesteps", {"name": "uniform", "hi": 3})


def test_concept_errors():
    with pytest.raises(ConfigError, match="unknown concept 'nonexistent_thing'"):
        load_config(["concept=nonexistent_thing"])
    with pytest.raises(ConfigError, match="nothing to erase"):
        load_config(["concept="])
    with pytest.raises(ConfigError, match="empty concept name"):
        load_config(["concept=a,,b"])
    from ace_lightning.data.prompts import ErasureRequest

    with pytest.raises(ConfigError, match="non-empty concept"):
        ErasureRequest(concept="  ", neutral="x")
    with pytest.raises(ConfigError, match="unknown kind"):
        ErasureRequest(concept="dog", kind="animal", neutral="x")


def test_missing_model_path_is_clear(tmp_path):
    from ace_lightning.models.loading import ModelNotFoundError, load_components

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_components(str(tmp_path / "nope"))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match=r"missing \['text_encoder'"):
        load_components(str(tmp_path / "half"))
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        load_components("nobody/not-a-cached-model")


def test_cli_reports_config_errors(capsys):
    from ace_lightning.train import main

    with pytest.raises(SystemExit, match="config error"):
        main([DOG, "loss.etaa=1"])
    assert Path(EXPERIMENTS_DIR / "base.yaml").is_file()


def test_sweep_files_name_real_keys_and_the_logged_metric():
    for p in (EXPERIMENTS_DIR / "sweeps").glob("*.yaml"):
        sweep = OmegaConf.to_container(OmegaConf.load(p))
        assert sweep["metric"]["name"] in {"train/loss", "train/loss_erase", "train/loss_pres", "train/loss_gate"}
        overrides = []
        for key, spec in sweep["parameters"].items():
            value = spec["values"][0] if "values" in spec else spec["min"]
            overrides.append(f"{key}={value}")
        cfg = load_config([DOG, *overrides])  # every swept key exists in the schema
        assert OmegaConf.select(cfg, next(iter(sweep["parameters"]))) is not None
