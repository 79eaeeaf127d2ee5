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


def test_value_given_to_a_group_names_the_group_and_its_keys():
    """``logger=none`` (compare's form) given to train said only "bad value in command-line overrides: None"."""
    with pytest.raises(ConfigError, match=r"'logger' is a group.*logger\.wandb"):
        load_config([DOG, "logger=none"])
    with pytest.raises(ConfigError, match=r"trainer\.max_steps.*'many'"):
        load_config([DOG, "trainer.max_steps=many"])


def test_registry_unknown_name_and_key():
    with pytest.raises(ConfigError, match="valid: band, uniform"):
        registry.build("timesteps", {"name": "gaussian"})
    with pytest.raises(ConfigError, match="valid keys"):
        registry.build("timesteps", {"name": "uniform", "hi": 3})


def test_any_concept_by_name():
    """A phrase without a preset is an ad-hoc request: kind= (default object), neutral= (default by kind), synonyms=."""
    cfg = load_config(["concept=van gogh", "kind=style"])
    (c,) = cfg.concepts
    assert (c.concept, c.kind, c.neutral, list(c.synonyms)) == ("van gogh", "style", "art", [])
    cfg = load_config(["concept=dragon", "neutral=animal", "synonyms=[wyvern,drake]"])
    assert (cfg.concepts[0].neutral, list(cfg.concepts[0].synonyms)) == ("animal", ["wyvern", "drake"])
    preset = load_config(["concept=circle,dragon"])  # presets keep their own neutral and synonyms
    assert [c.neutral for c in preset.concepts] == ["shape", "object"] and list(preset.concepts[0].synonyms)
    with pytest.raises(ConfigError, match="unknown kind 'animal'"):
        load_config(["concept=dragon", "kind=animal"])
    from ace_lightning.method.adapter import slug

    assert slug("ñandú") == "ñandú" and slug("ñandú") != slug("and")  # non-ASCII names keep distinct folders


def test_keep_list_for_every_ad_hoc_concept(tmp_path):
    """``preserve=`` (names, or ``@<file>`` as for concept=): phrases every ad-hoc concept keeps; the preserve prompts
    hold each phrase once however many concepts list it, and a kept phrase may not be erased."""
    from ace_lightning.data.prompts import ErasureRequest, family, preserve_prompts

    keep = tmp_path / "keep.txt"
    keep.write_text("zorp\n# a comment\nblix\n")
    cfg = load_config(["concept=dragon,wyvern", f"preserve=@{keep},snarf"])
    assert [list(c.preserve) for c in cfg.concepts] == [["zorp", "blix", "snarf"]] * 2
    requests = [ErasureRequest(**{k: (list(v) if k in ("synonyms", "preserve") else v) for k, v in c.items()})
                for c in cfg.concepts]
    prompts = preserve_prompts(requests, family("sd", [], 0), 20, 0)
    assert [sum(f" {w}" in f" {p}" for p in prompts) for w in ("zorp", "blix", "snarf")] == [1, 1, 1], prompts
    with pytest.raises(ConfigError, match="both erased and kept"):
        load_config(["concept=dragon,zorp", f"preserve=@{keep}"])


@pytest.mark.parametrize("override,message", [
    ("adapter.rank=0", r"adapter.rank=0 is out of range: must be >= 1"),
    ("loss.eta=-1", r"loss.eta=-1.0 is out of range: must be >= 0"),
    ("trainer.max_steps=-5", r"trainer.max_steps=-5 is out of range: must be >= 0"),
    ("optim.lr=0", r"optim.lr=0.0 is out of range: must be > 0"),
    ("data.batch_size=0", r"data.batch_size=0 is out of range"),
])
def test_nonsense_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([DOG, override])


def test_concept_errors():
    with pytest.raises(ConfigError, match="given twice"):
        load_config(["concept=circle,circle"])
    with pytest.raises(ConfigError, match="no concept name|parse"):
        load_config(["concept=,"])
    with pytest.raises(ConfigError, match="shorter name="):
        load_config(["concept=" + "x" * 300])
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


@pytest.mark.parametrize("args,message", [
    ([DOG, "loss.etaa=1"], "config error: unknown config key 'loss.etaa'"),
    (["concept=,"], "config error:"),
    (["concept=circle,circle"], "config error: concept 'circle' is given twice"),
    (["concept=" + "y" * 300], "config error: run name of 300 characters"),
    ([DOG, "adapter.rank=0"], "config error: adapter.rank=0 is out of range"),
    ([DOG, "model.path=/nonexistent/model"], "error: model directory /nonexistent/model does not exist"),
    ([DOG, "ckpt_path=last", "output_dir=/tmp/ace-no-such-run"], "error: checkpoint to resume from not found"),
    ([DOG, "output_dir=/proc/ace-cannot-write"], "config error: output_dir /proc/ace-cannot-write"),
])
def test_cli_errors_are_one_line(args, message, capsys, monkeypatch):
    """Bad input: exit status 2, one line on stderr naming the problem, no traceback (unless ACE_DEBUG)."""
    from ace_lightning.train import main

    monkeypatch.delenv("ACE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert Path(EXPERIMENTS_DIR / "base.yaml").is_file()


def test_method_data_and_bench_do_not_import_toyworld():
    """ToyWorld registers what it provides; the generic packages never import it (so they work without it)."""
    import ast
    from pathlib import Path

    import ace_lightning

    root = Path(ace_lightning.__file__).parent
    offenders = []
    for pkg in ("method", "data", "bench"):
        for f in sorted((root / pkg).glob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{pkg}/{f.name}: {m}" for m in mods if "toyworld" in m]
    assert offenders == []


def test_optimizer_is_chosen_by_name():
    """``optim.name`` selects a registry entry (a typo fails at load, naming the valid ones); the factory keeps a
    group's own lr (ACE's gate group) and the method recipes choose their papers' optimizer."""
    import torch

    from ace_lightning.method.optim import optimizer_factory

    with pytest.raises(ConfigError, match="adamw"):
        load_config(["concept=circle", "optim.name=sgd"])
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = optimizer_factory(OmegaConf.create({"name": "adam", "lr": 1e-3, "weight_decay": 0.0}))(
        [{"params": [a]}, {"params": [b], "lr": 0.0}])
    assert type(opt) is torch.optim.Adam and [g["lr"] for g in opt.param_groups] == [1e-3, 0.0]
    assert load_config(["concept=circle"]).optim.name == "adamw"
    assert load_config(["concept=circle", "method=esd_x"]).optim.name == "adam"
    assert load_config(["concept=circle", "method=mace"]).optim.weight_decay == pytest.approx(0.01)
