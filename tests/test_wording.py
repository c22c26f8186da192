"""Answer wording: train and eval answers come from disjoint wording pools, and seen_wording rows pair with
unseen rows on identical prompts so the memorisation share can be measured."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_gen.generate import main
from data_gen.leakage import LeakageError, check_wording, find_wording
from data_gen.offline import answer_lists, generate_trait, partition_wording
from data_gen.spec import BUILTIN_DIR, SpecError, load_trait_spec
from train.assets import read_record

TRAITS = ["care", "honesty", "instance_reduction"]
SMALL = ["--sft_train_per_trait", "30", "--dpo_train_per_trait", "40", "--eval_id_per_trait", "16",
         "--eval_ood_per_axis_per_trait", "16", "--leakage_embedding_check", "false", "--diversity_sample", "50"]
GEN = dict(seed=0, n_sft_train=30, n_dpo_train=40, n_eval_id=16, n_eval_ood=16, heldout_formats=["multi_turn", "agentic"])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def generated():
    return {t: generate_trait(load_trait_spec(BUILTIN_DIR / f"{t}.yaml"), **GEN) for t in TRAITS}


@pytest.mark.parametrize("trait", TRAITS)
def test_pools_are_disjoint_and_cover_every_answer_list(trait, generated):
    spec = load_trait_spec(BUILTIN_DIR / f"{trait}.yaml")
    pools = generated[trait]["wording"]
    full = answer_lists(spec)
    assert set(pools["train"]) == set(pools["eval"]) == set(full)
    for field, entries in full.items():
        train, ev = ({e for e in pools[p][field] if e.strip()} for p in ("train", "eval"))
        assert train and ev and not train & ev, field
        assert train | ev == {e for e in entries if e.strip()}, field


@pytest.mark.parametrize("trait", TRAITS)
def test_answers_use_only_their_own_pool(trait, generated):
    out, pools = generated[trait], generated[trait]["wording"]
    sides = ("chosen", "rejected")
    train = [(r["id"], r[s][0]["content"]) for r in out["dpo"]["train"] for s in sides]
    unseen = [(r["id"], r[s][0]["content"]) for sp in ("eval_id", "eval_ood") for r in out["dpo"][sp]
              if r["wording"] == "unseen" for s in sides]
    seen = [(r["id"], r[s][0]["content"]) for r in out["dpo"]["eval_id"] if r["axis"] == "seen_wording" for s in sides]
    assert unseen and seen
    assert find_wording(pools["train"], unseen) == []
    assert find_wording(pools["eval"], train) == []
    assert find_wording(pools["train"], seen), "seen_wording rows must carry train-pool wording"


def test_check_wording_fails_loudly_on_a_crossed_row(generated):
    out = generated["care"]
    data = {k: {s: [dict(r) for r in rows] for s, rows in out[k].items()} for k in ("sft", "dpo")}
    check_wording({"care": out["wording"]}, data)  # clean data passes
    seen_row = next(r for r in data["dpo"]["eval_id"] if r["axis"] == "seen_wording")
    data["dpo"]["eval_id"].append({**seen_row, "id": "care-crossed", "wording": "unseen"})
    with pytest.raises(LeakageError, match="eval row care-crossed uses train-pool"):
        check_wording({"care": out["wording"]}, data)


@pytest.mark.parametrize("trait", TRAITS)
def test_seen_wording_rows_pair_with_unseen_rows_on_identical_prompts(trait, generated):
    rows = generated[trait]["dpo"]["eval_id"]
    seen = [r for r in rows if r["axis"] == "seen_wording"]
    twins = {r["pair_id"]: r for r in rows if r["axis"] == "id" and r["pair_id"]}
    assert len(seen) == len(twins) == round(0.5 * GEN["n_eval_id"])
    for r in seen:
        twin = twins[r["pair_id"]]
        assert (r["prompt"], r["failure_mode"], r["domain"], r["format"]) == \
               (twin["prompt"], twin["failure_mode"], twin["domain"], twin["format"])
        assert (r["wording"], twin["wording"]) == ("seen", "unseen")
    assert sum(r["chosen"] != twins[r["pair_id"]]["chosen"] for r in seen) >= len(seen) // 2


def test_same_seed_byte_identical_with_wording(tmp_path):
    for name in ("a", "b"):
        main(["--output_dir", str(tmp_path / name), "--seed", "4", *SMALL])
    for f in sorted((tmp_path / "a" / "jsonl").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "jsonl" / f.name).read_bytes(), f.name
    meta = read_record(tmp_path / "a")  # data_gen/card.py: generation.json
    overlap = meta["leakage_checks"]["answer_wording"]["verbatim_sentence_overlap"]
    assert set(overlap) == set(TRAITS)
    for trait, v in overlap.items():
        assert v["unseen_chosen"] == v["unseen_rejected"] == 0.0, trait
        assert v["seen_rejected"] > 0.3, trait


def test_one_entry_answer_list_is_a_clear_error(tmp_path):
    data = yaml.safe_load((BUILTIN_DIR / "care.yaml").read_text())
    data["phrases"]["autonomy"] = ["It's your call."]
    path = tmp_path / "mytrait.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as e:
        partition_wording(load_trait_spec(path), random.Random(0), 0.33)
    assert str(path) in str(e.value) and "phrases.autonomy" in str(e.value) and "at least 2" in str(e.value)


def test_empty_variants_keep_their_share_in_both_pools():
    spec = load_trait_spec(BUILTIN_DIR / "instance_reduction.yaml")
    train, ev = partition_wording(spec, random.Random(0), 0.33)
    for pool in (train, ev):
        pref = pool.phrases["preference"]
        assert "" in pref and any(p.strip() for p in pref)


def _eval_rows_and_scores():
    """Four eval_id pairs with seen_wording twins and one eval_ood row; dpo gets every seen row right and
    half of the unseen ones."""
    rows = []
    for j in range(4):
        for axis in ("id", "seen_wording"):
            rows.append({"trait": "care", "split": "eval_id", "axis": axis, "pair_id": f"care-wording-{j:04d}",
                         "framing": "", "id": f"{axis}-{j}"})
    rows.append({"trait": "care", "split": "eval_ood", "axis": "heldout_domain", "pair_id": "", "framing": "", "id": "o"})
    correct = {"base": [1, 1, 0, 0, 1, 1, 0, 0, 1], "dpo": [1, 1, 0, 1, 1, 1, 0, 1, 1]}
    scored = {m: {k: np.array(v, dtype=float) for k in ("norm_correct", "correct", "norm_margin", "margin")}
              for m, v in correct.items()}
    return rows, scored


def test_seen_wording_rows_stay_out_of_pooled_numbers_and_give_a_paired_gap():
    from eval.preference import preference_tables, wording_gap
    from eval.report import _wording_lines

    rows, scored = _eval_rows_and_scores()
    table = {(r["trait"], r["split"], r["axis"], r["model"]): r for r in preference_tables(rows, scored, 100, 0)}
    assert table[("care", "eval_id", "all", "dpo")]["norm_accuracy"]["n"] == 4
    assert table[("care", "eval_id", "all", "dpo")]["norm_accuracy"]["mean"] == 0.5
    assert table[("care", "eval_id", "seen_wording", "dpo")]["norm_accuracy"]["mean"] == 1.0
    assert table[("all", "all", "all", "dpo")]["norm_accuracy"]["n"] == 5
    gaps = {(g["trait"], g["model"]): g for g in wording_gap(rows, scored, 100, 0)}
    dpo = gaps[("care", "dpo")]
    assert dpo["n_pairs"] == 4 and dpo["seen_norm_accuracy"]["mean"] == 1.0 and dpo["unseen_norm_accuracy"]["mean"] == 0.5
    assert dpo["norm_accuracy_gap"]["mean"] == 0.5
    assert gaps[("all", "base")]["norm_accuracy_gap"]["mean"] == 0.0
    text = "\n".join(_wording_lines({"wording_gap": list(gaps.values())}))
    assert "Seen vs unseen answer wording" in text and "| care | dpo | 4 | 100.0%" in text
