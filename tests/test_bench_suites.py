"""Suite files: every one loads, rows are stable and grouped as documented, CSV suites refuse to run without a CSV."""
import pytest

from ace_lightning.bench.run import parse_args, route_overrides
from ace_lightning.bench.suites import Selection, load_suite, suite_names
from ace_lightning.registry import ConfigError

EXPECTED = {"objects", "celebrities", "nsfw", "styles", "coco", "toy-objects", "toy-styles", "toy-characters"}


def test_all_suites_present_and_load():
    assert EXPECTED <= set(suite_names())
    for name in suite_names():
        suite = load_suite(name)
        assert suite.name == name and suite.metrics and suite.sampler["steps"] > 0
        if suite.classes is None:  # csv suites
            continue
        rows = suite.rows(Selection(images_per_prompt=1))
        keys = [(r.index, r.seed) for r in rows]
        assert rows and len(keys) == len(set(keys)), name
        assert {r.group for r in rows} >= {"erased", "retained"}, name


def test_objects_rows_match_protocol():
    suite = load_suite("objects")
    rows = suite.rows(Selection(images_per_prompt=100))
    by_group = {g: [r for r in rows if r.group == g] for g in ("erased", "synonym", "retained")}
    assert len(by_group["erased"]) == 100 and {r.prompt for r in by_group["erased"]} == {"a photo of the airplane"}
    assert len(by_group["synonym"]) == 300 and all(r.target == 0 for r in by_group["synonym"])
    assert len(by_group["retained"]) == 900
    assert sorted({r.seed for r in rows}) == list(range(100))
    assert len(suite.classes.names) == 10 and all(len(s) == 3 for s in suite.prompts.classes.values())


def test_indices_are_stable_across_selections():
    suite = load_suite("toy-objects")
    full = {(r.prompt, r.seed): r.index for r in suite.rows(Selection(images_per_prompt=2, erased=["square"]))}
    default = {(r.prompt, r.seed): r.index for r in suite.rows(Selection(images_per_prompt=2))}
    assert all(default[k] == full[k] for k in default.keys() & full.keys())  # erased choice does not renumber
    sub = suite.rows(Selection(images_per_prompt=2, erased=["square"], classes=["square", "star"], templates=2))
    assert sub and all(full[(r.prompt, r.seed)] == r.index for r in sub)
    groups = {"erased", "synonym", "retained"}
    assert {r.label for r in sub} == {"square", "star"} and {r.group for r in sub} == groups | {f"{g}_mod" for g in groups}


def test_modifier_groups():
    """Modifier prompts: the class word after drawn modifier words, their own groups, and the plain rows keep
    the indices (image names) they had without modifiers."""
    from ace_lightning.bench.suites import ClassPrompts

    classes = {"circle": ["ring"], "square": []}
    plain = ClassPrompts(["a {}", "a photo of a {}"], classes=classes, erased=["circle"])
    mods = ClassPrompts(["a {}", "a photo of a {}"], classes=classes, erased=["circle"],
                        modifier_templates=["a {color} {style} {}"],
                        modifiers={"color": ["red", "blue"], "style": ["dotted", "striped"]})
    sel = Selection(images_per_prompt=2)
    before, after = plain.rows("t", sel), mods.rows("t", sel)
    assert [r for r in after if not r.group.endswith("_mod")] == before
    extra = [r for r in after if r.group.endswith("_mod")]
    assert {r.group for r in extra} == {"erased_mod", "synonym_mod", "retained_mod"}
    for r in extra:
        color, style, *noun = r.prompt.split()[1:]
        assert color in ("red", "blue") and style in ("dotted", "striped")
        assert " ".join(noun) in ({"circle", "ring"} if r.label == "circle" else {"square"})
    assert mods.rows("t", sel) == after  # the drawn words are fixed
    with pytest.raises(ConfigError, match="unknown slots"):
        ClassPrompts(["a {}"], classes=classes, modifier_templates=["a {size} {}"], modifiers={"color": ["red"]})
    with pytest.raises(ConfigError, match="needs one"):
        ClassPrompts(["a {}"], classes=classes, modifier_templates=["a {color} thing"], modifiers={"color": ["red"]})


def test_described_group_holds_the_erased_classes_looks_in_words():
    """``described_by``: each erased class's descriptions in the plain templates form group ``described`` (target:
    the class), after every other row (whose indices do not move); a class without a description is an error."""
    from ace_lightning.bench.suites import ClassPrompts
    from ace_lightning.registry import register

    looks = {"zorb": ["a red dotted star"], "miv": ["a blue plain heart"]}
    register("class_source", "_test_looks")(lambda: looks)
    classes = {"zorb": [], "miv": []}
    plain = ClassPrompts(["{}", "a photo of {}"], classes=classes, erased=["zorb"])
    desc = ClassPrompts(["{}", "a photo of {}"], classes=classes, erased=["zorb"], described_by="_test_looks")
    sel = Selection(images_per_prompt=2)
    before, after = plain.rows("t", sel), desc.rows("t", sel)
    assert after[: len(before)] == before
    extra = after[len(before):]
    assert {(r.prompt, r.group, r.label, r.target) for r in extra} == {
        ("a red dotted star", "described", "zorb", 0), ("a photo of a red dotted star", "described", "zorb", 0)}
    assert len(extra) == 4  # 2 templates x 2 seeds, erased class only
    register("class_source", "_test_looks_short")(lambda: {"zorb": ["a red dotted star"]})
    with pytest.raises(ConfigError, match=r"no description for \['miv'\]"):
        ClassPrompts(["{}"], classes=classes, described_by="_test_looks_short")


def test_name_list_suites():
    for name in ("celebrities", "styles"):
        suite = load_suite(name)
        rows = suite.rows(Selection(images_per_prompt=1))
        erased = {r.label for r in rows if r.group == "erased"}
        retained = {r.label for r in rows if r.group == "retained"}
        assert erased and retained and not erased & retained
        assert len({r.prompt.replace(r.label, "{}") for r in rows}) == 5  # 5 templates


@pytest.mark.parametrize("name", ["nsfw", "coco"])
def test_csv_suites_refuse_without_csv(name, tmp_path):
    suite = load_suite(name)
    with pytest.raises(ConfigError, match="refuses to run without its CSV.*csv=<path"):
        suite.rows(Selection())
    with pytest.raises(ConfigError, match="not found"):
        suite.rows(Selection(csv=str(tmp_path / "missing.csv")))


def test_nsfw_csv_seeds(tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,evaluation_seed,categories\nfirst prompt,123,x\nsecond prompt,7,y\n")
    rows = load_suite("nsfw").rows(Selection(csv=str(csv)))
    assert [(r.prompt, r.seed, r.index) for r in rows] == [("first prompt", 123, 0), ("second prompt", 7, 1)]


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="valid keys"):
        parse_args(["suite=toy-objects", "stepz=3"])
    with pytest.raises(ConfigError, match="unknown suite"):
        load_suite("no-such-suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprompts: {name: classes, classes: {a: []}, templates: ['{}']}\nsampler: {steps: 1}\n"
                   "metrics: []\nsamplr: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_suite(str(bad))
    with pytest.raises(ConfigError, match="unknown class"):
        load_suite("toy-objects").rows(Selection(erased=["hexagon"]))


def test_run_keys_are_routed_to_scorers():
    cfg = parse_args(["suite=objects", "pretrained=/x/clip.bin", "threshold=0.5"])
    m = route_overrides(load_suite("objects").metrics, cfg)
    assert m[0]["scorer"]["pretrained"] == "/x/clip.bin" and "threshold" not in m[0]["scorer"]
    n = route_overrides(load_suite("nsfw").metrics, cfg)
    assert n[0]["scorer"]["threshold"] == 0.5 and "pretrained" not in n[0]["scorer"]


def test_suite_files_comment_every_top_level_key():
    from ace_lightning.bench.suites import SUITES_DIR

    for path in SUITES_DIR.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line and not line.startswith((" ", "#", "-")):
                assert "#" in line, f"{path.name}: key without a comment: {line!r}"
