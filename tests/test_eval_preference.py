"""Length-normalised preference accuracy: a pair whose chosen answer is longer can lose on summed log-likelihood
yet win per token; the tables, framing gap, cross-trait matrix, length warning and headline all carry it."""

import numpy as np
import pytest

from train import contract


class _Variants:
    names = ["base", "dpo"]
    tokenizer = None


def _rows():
    rows = []
    for i, (trait, split) in enumerate([("care", "eval_id"), ("care", "eval_ood"), ("honesty", "eval_id"), ("honesty", "eval_ood")]):
        rows.append({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": f"c{i}"}],
                     "rejected": [{"role": "assistant", "content": f"r{i}"}], "trait": trait, "split": split,
                     "axis": "framing" if split == "eval_ood" else "id", "framing": "test" if i % 2 else "",
                     "pair_id": "", "id": str(i)})
    assert not [contract.row_problem(r) for r in rows if contract.row_problem(r)]
    return rows


def _scored(monkeypatch, logprobs: dict, n_tokens):
    """score_pairs on made-up per-item log-likelihoods (items alternate chosen, rejected)."""
    import eval.preference as pref
    from eval.scoring import Item

    monkeypatch.setattr(pref, "render_chat", lambda tok, p, c, m: Item([1], [2]))
    monkeypatch.setattr(pref, "score_items", lambda v, items, bs, desc: {
        n: {"logprob": np.array(lp, dtype=float), "n_tokens": np.array(n_tokens)} for n, lp in logprobs.items()})
    return pref.score_pairs(_Variants(), _rows(), 8, 512)


# chosen 6 tokens, rejected 2 tokens in every pair
N_TOKENS = [6, 2] * 4


def test_summed_and_normalised_accuracy_disagree_on_a_long_chosen_answer(monkeypatch):
    # pair 0: chosen -6 (mean -1.0) vs rejected -3 (mean -1.5): summed says rejected, per token says chosen
    # pair 1: chosen -12 (mean -2.0) vs rejected -2 (mean -1.0): both say rejected
    # pair 2: chosen -1.2 (mean -0.2) vs rejected -2 (mean -1.0): both say chosen
    # pair 3: chosen -5.4 (mean -0.9) vs rejected -2.4 (mean -1.2): summed rejected, per token chosen
    base = [-6, -3, -12, -2, -1.2, -2, -5.4, -2.4]
    scored = _scored(monkeypatch, {"base": base, "dpo": base}, N_TOKENS)
    s = scored["base"]
    assert list(s["correct"]) == [0, 0, 1, 0]
    assert list(s["norm_correct"]) == [1, 0, 1, 1]
    np.testing.assert_allclose(s["norm_margin"], [0.5, -1.0, 0.8, 0.3])
    np.testing.assert_allclose(s["margin"], [-3, -10, 0.8, -3.0])
    assert list(s["chosen_tokens"]) == [6] * 4 and list(s["rejected_tokens"]) == [2] * 4


def test_tables_carry_normalised_accuracy_with_paired_change(monkeypatch):
    from eval.preference import cross_trait_matrix, preference_tables

    base = [-6, -3, -12, -2, -1.2, -2, -5.4, -2.4]
    dpo = [-6, -3, -5, -2, -1.2, -2, -5.4, -2.4]  # pair 1 flips to chosen per token (mean -0.83 > -1.0), not summed
    scored = _scored(monkeypatch, {"base": base, "dpo": dpo}, N_TOKENS)
    table = preference_tables(_rows(), scored, n_boot=200, seed=0)
    recs = {(r["trait"], r["split"], r["axis"], r["model"]): r for r in table}
    overall = recs[("all", "all", "all", "dpo")]
    assert overall["norm_accuracy"]["mean"] == pytest.approx(1.0)
    assert overall["accuracy"]["mean"] == pytest.approx(0.25)
    assert overall["norm_accuracy_delta"]["mean"] == pytest.approx(0.25)
    assert overall["accuracy_delta"]["mean"] == pytest.approx(0.0)
    assert recs[("all", "all", "all", "base")]["norm_accuracy"]["mean"] == pytest.approx(0.75)
    # the matrix reads the normalised change: care gained pair 1, honesty nothing
    matrix = cross_trait_matrix(table)
    assert matrix["care"]["dpo"]["mean"] == pytest.approx(0.5)
    assert matrix["honesty"]["dpo"]["mean"] == pytest.approx(0.0)


def test_length_stats_warn_when_chosen_is_longer(monkeypatch):
    from eval.preference import length_stats, preference_tables
    from eval.report import headline, length_warning, render_markdown

    base = [-6, -3, -12, -2, -1.2, -2, -5.4, -2.4]
    rows = _rows()
    scored = _scored(monkeypatch, {"base": base, "dpo": base}, N_TOKENS)
    lens = length_stats(rows, scored)
    assert lens["all"]["chosen_mean_tokens"] == 6 and lens["all"]["rejected_mean_tokens"] == 2
    assert lens["all"]["relative_gap"] == pytest.approx(2.0) and lens["all"]["length_confounded"]
    report = {"preference_lengths": lens, "preference": preference_tables(rows, scored, 50, 0), "tuned": ["dpo"]}
    assert "confounded by length" in length_warning(report)
    assert headline(report)[0].startswith("WARNING")
    assert "length-confounded" in render_markdown(report)

    even = _scored(monkeypatch, {"base": base, "dpo": base}, [10, 9] * 4)  # 11% apart: no warning
    lens = length_stats(rows, even)
    assert not lens["all"]["length_confounded"]
    assert length_warning({"preference_lengths": lens}) is None


def test_framing_gap_has_normalised_accuracy(monkeypatch):
    from eval.preference import framing_gap

    rows = _rows()
    for r, f in zip(rows[1::2], ("test", "deployment")):
        r.update(pair_id="care-p0", trait="care", framing=f)
    base = [-6, -3, -12, -2, -1.2, -2, -5.4, -2.4]
    scored = _scored(monkeypatch, {"base": base, "dpo": base}, N_TOKENS)
    gaps = {(g["trait"], g["model"]): g for g in framing_gap(rows, scored, 100, 0)}
    # test-framed pair 1 loses per token, deployment-framed pair 3 wins: gap -1
    assert gaps[("care", "base")]["norm_accuracy_gap"]["mean"] == pytest.approx(-1.0)
    assert gaps[("care", "base")]["accuracy_gap"]["mean"] == pytest.approx(0.0)
