"""Batched log-likelihood scoring: only completion tokens count, padding changes nothing, bootstrap is seeded."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def base_variants(tiny_model_dir):
    from eval.variants import load_variants

    return load_variants(tiny_model_dir, {})


CONVS = [
    ([{"role": "user", "content": "Tell me about the weather today."}], "It is fine and calm."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}], "Because the model can help people and they know it well."),
    ([{"role": "user", "content": "What is the capital of france and why is paris big?"}], "Paris."),
    ([{"role": "user", "content": "Hi"}], "Hello there, I think I can help you with that question today, maybe."),
    ([{"role": "user", "content": "One two three four five six seven eight nine ten"}], "Yes."),
]


def _hand_logprob(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(prompt_ids)
    return sum(lp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


def test_completion_is_the_assistant_turn(base_variants):
    from eval.scoring import render_chat

    tok = base_variants.tokenizer
    item = render_chat(tok, CONVS[0][0], CONVS[0][1])
    assert tok.decode(item.completion_ids) == "It is fine and calm.<|im_end|>"
    assert tok.decode(item.prompt_ids).endswith("<|im_start|>assistant\n")


def test_batched_scores_match_unbatched_and_hand_computation(base_variants):
    from eval.scoring import render_chat, score_items

    tok, model = base_variants.tokenizer, base_variants.model
    items = [render_chat(tok, p, c) for p, c in CONVS]
    assert len({len(i.prompt_ids) + len(i.completion_ids) for i in items}) > 2  # padding really happens
    batched = score_items(base_variants, items, batch_size=5)["base"]
    single = score_items(base_variants, items, batch_size=1)["base"]
    hand = np.array([_hand_logprob(model, i.prompt_ids, i.completion_ids) for i in items])
    np.testing.assert_allclose(batched["logprob"], single["logprob"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batched["logprob"], hand, rtol=1e-4, atol=1e-4)
    assert list(batched["n_tokens"]) == [len(i.completion_ids) for i in items]


def test_prompt_tokens_do_not_count(base_variants):
    """Same completion after a different prompt: the count is the completion's; scores differ only via context."""
    from eval.scoring import Item, score_items

    a = Item([5, 6, 7, 8], [9, 10])
    b = Item([5, 6, 7, 8, 11, 12, 13], [9, 10])
    s = score_items(base_variants, [a, b], batch_size=2)["base"]
    assert list(s["n_tokens"]) == [2, 2]
    hand = [_hand_logprob(base_variants.model, it.prompt_ids, it.completion_ids) for it in (a, b)]
    np.testing.assert_allclose(s["logprob"], hand, rtol=1e-4, atol=1e-4)


def test_empty_completion_is_an_error(base_variants):
    from eval.scoring import Item, score_items

    with pytest.raises(ValueError, match="item 1 has an empty"):
        score_items(base_variants, [Item([1, 2], [3]), Item([1, 2], [])], desc="pairs")


def test_bootstrap_is_seeded_and_covers_the_mean():
    from eval.stats import bootstrap_ci, paired_delta, summarize

    rng = np.random.default_rng(1)
    x = rng.random(200)
    assert bootstrap_ci(x, 500, seed=3) == bootstrap_ci(x, 500, seed=3)
    assert bootstrap_ci(x, 500, seed=3) != bootstrap_ci(x, 500, seed=4)
    s = summarize(x, 500, 0)
    assert s["ci_low"] < x.mean() < s["ci_high"] and s["n"] == 200
    d = paired_delta(x + 0.2, x, 200, 0)
    assert d["mean"] == pytest.approx(0.2) and d["significant"]
    with pytest.raises(ValueError, match="same items"):
        paired_delta(x, x[:10])


def test_shared_prompt_scores_match_full_sequences(base_variants):
    """Chosen/rejected answers after one prompt: encoding the prompt once gives the full-sequence scores."""
    from eval.scoring import render_chat, score_items

    tok, model = base_variants.tokenizer, base_variants.model
    items = []
    for p, c in CONVS:
        items += [render_chat(tok, p, c), render_chat(tok, p, c[: max(1, len(c) // 3)] + " no")]
    shared = score_items(base_variants, items, batch_size=4)["base"]
    full = score_items(base_variants, items, batch_size=4, share_prompts=False)["base"]
    single = score_items(base_variants, items, batch_size=1)["base"]
    hand = np.array([_hand_logprob(model, i.prompt_ids, i.completion_ids) for i in items])
    np.testing.assert_allclose(shared["logprob"], hand, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(full["logprob"], hand, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(single["logprob"], hand, rtol=1e-4, atol=1e-4)
    assert list(shared["n_tokens"]) == [len(i.completion_ids) for i in items]
