"""Trait directions in a model's residual stream, Persona Vectors style (Chen et al. 2025).

For each trait, the same user requests are rendered with the model's chat template under a trait-consistent
system prompt and under each violating one; the direction at layer l is the mean hidden state at the last prompt
token under the consistent prompt minus the mean under the violating ones, normalised. The layer is the one whose
projection best separates held-out answers: for each held-out DPO pair (chosen = consistent answer, rejected =
violating answer) the mean hidden state over the answer's tokens is projected on the direction, and a pair counts
as separated when the chosen answer projects higher. Every layer's separation is kept so the choice can be checked.

Layer l is `hidden_states[l]` of the decoder (l = 1..num_hidden_layers; 0, the embeddings, is left out: the last
prompt token is the same template token under every system prompt there).

The functions take plain strings and messages (`TraitPrompts`); `trait_prompts_from_data` builds them from a trait
spec's YAML and a data_gen folder without importing data_gen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DIRECTIONS_FILE = "persona_directions.safetensors"
DIRECTIONS_META = "persona_directions.json"


@dataclasses.dataclass
class TraitPrompts:
    """What one trait's direction is built and judged from.

    `consistent` and `violating` are system prompts; `questions` are user requests; `heldout` are
    (prompt messages, chosen messages, rejected messages) of held-out pairs, chosen being the consistent answer.
    """

    trait: str
    consistent: str
    violating: list[str]
    questions: list[str]
    heldout: list[tuple[list[dict], list[dict], list[dict]]]


@dataclasses.dataclass
class TraitDirection:
    trait: str
    layer: int
    vector: torch.Tensor  # unit vector, [hidden_size], float32
    separation: dict[int, dict[str, float]]  # layer -> pair_accuracy, auc, effect_size, over the held-out pairs
    questions: int = 0
    pairs: int = 0

    def meta(self) -> dict:
        return {"layer": self.layer, "questions": self.questions, "pairs": self.pairs,
                "chosen_separation": self.separation.get(self.layer, {}),
                "separation": {str(k): v for k, v in self.separation.items()}}


# ---- activations ----

def decoder_of(model):
    """The decoder stack (LoRA layers stay on inside it), unwrapping DDP; running it skips the LM head."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DistributedDataParallel":
        model = model.module
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None else model


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, messages: list[dict], max_length: int = 1024) -> tuple[list[int], int, int]:
    """(token ids, start, end) of a prompt ready for the assistant turn; [start, end) is its last token."""
    ids = _ids(tokenizer, messages, True)[-max_length:]
    return ids, len(ids) - 1, len(ids)


def render_response(tokenizer, prompt: list[dict], response: list[dict], max_length: int = 1024):
    """(token ids, start, end) of prompt + response; [start, end) are the response's tokens."""
    head = _ids(tokenizer, prompt, True)
    ids = _ids(tokenizer, prompt + response, False)
    start = 0
    while start < min(len(head), len(ids)) and head[start] == ids[start]:
        start += 1
    if start >= len(ids):
        raise ValueError(f"response {response!r} renders to no tokens after its prompt")
    if len(ids) > max_length:  # keep the whole response when it fits, cutting the prompt's start
        cut = min(len(ids) - max_length, start)
        ids, start = ids[cut:cut + max_length], start - cut
    return ids, start, len(ids)


@torch.no_grad()
def span_means(model, pad_id: int, rendered: list[tuple[list[int], int, int]], batch_size: int = 8) -> torch.Tensor:
    """Mean hidden state over each sequence's [start, end) span at every layer: [n, num_layers, hidden], float32.

    The model is put in eval mode (no dropout) and restored; call it under the adapter you want measured."""
    decoder = decoder_of(model)
    device = next(decoder.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(rendered), batch_size):
            batch = rendered[i:i + batch_size]
            width = max(len(ids) for ids, _, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            span = torch.zeros((len(batch), width), dtype=torch.float32)
            for row, (ids, start, end) in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
                span[row, start:end] = 1.0 / (end - start)
            hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             output_hidden_states=True, use_cache=False).hidden_states[1:]
            span = span.to(hidden[0].device)
            out.append(torch.stack([torch.einsum("bsh,bs->bh", h.float(), span) for h in hidden], dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_activations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> torch.Tensor:
    """Hidden state at the last prompt token of each conversation: [n, num_layers, hidden]."""
    return span_means(model, _pad_id(tokenizer), [render_prompt(tokenizer, c) for c in conversations], batch_size)


def response_activations(model, tokenizer, prompts: list[list[dict]], responses: list[list[dict]],
                         batch_size: int = 8) -> torch.Tensor:
    """Mean hidden state over each response's tokens, after its prompt: [n, num_layers, hidden]."""
    rendered = [render_response(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    return span_means(model, _pad_id(tokenizer), rendered, batch_size)


# ---- directions ----

def separation(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """How well projections tell chosen from rejected answers: the share of pairs where chosen projects higher, the
    unpaired AUC over all chosen vs all rejected, and the paired effect size mean(diff) / sd(diff)."""
    diff = chosen - rejected
    greater = (chosen[:, None] > rejected[None, :]).float() + 0.5 * (chosen[:, None] == rejected[None, :]).float()
    sd = diff.std().item() if len(diff) > 1 else 0.0
    return {"pair_accuracy": round((diff > 0).float().mean().item(), 4), "auc": round(greater.mean().item(), 4),
            "effect_size": round(diff.mean().item() / sd, 4) if sd > 0 else 0.0}


def trait_direction(model, tokenizer, prompts: TraitPrompts, batch_size: int = 8) -> TraitDirection:
    """The trait's unit direction at the layer that best separates its held-out pairs (pair accuracy, then AUC,
    then effect size); without held-out pairs, the layer with the largest mean difference."""
    if not prompts.questions or not prompts.violating:
        raise ValueError(f"trait {prompts.trait!r}: directions need questions and at least one violating prompt")
    consistent = [[{"role": "system", "content": prompts.consistent}, {"role": "user", "content": q}]
                  for q in prompts.questions]
    violating = [[{"role": "system", "content": v}, {"role": "user", "content": q}]
                 for v in prompts.violating for q in prompts.questions]
    acts = prompt_activations(model, tokenizer, consistent + violating, batch_size)
    diff = acts[:len(consistent)].mean(0) - acts[len(consistent):].mean(0)  # [layers, hidden]
    units = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    layers = range(1, units.shape[0] + 1)
    table = {}
    if prompts.heldout:
        p, c, r = zip(*prompts.heldout)
        both = response_activations(model, tokenizer, list(p) * 2, list(c) + list(r), batch_size)
        proj = torch.einsum("nlh,lh->nl", both, units)
        n = len(prompts.heldout)
        table = {layer: separation(proj[:n, layer - 1], proj[n:, layer - 1]) for layer in layers}
        best = max(layers, key=lambda k: (table[k]["pair_accuracy"], table[k]["auc"], table[k]["effect_size"], -k))
    else:
        logger.warning("trait %s: no held-out pairs; choosing the layer by the size of the mean difference",
                       prompts.trait)
        best = max(layers, key=lambda k: diff[k - 1].norm().item())
    return TraitDirection(prompts.trait, best, units[best - 1].clone(), table, len(prompts.questions),
                          len(prompts.heldout))


def build_directions(model, tokenizer, trait_prompts: dict[str, TraitPrompts], batch_size: int = 8):
    """trait -> TraitDirection for every trait in `trait_prompts`."""
    out = {}
    for trait, prompts in trait_prompts.items():
        out[trait] = trait_direction(model, tokenizer, prompts, batch_size)
        sep = out[trait].separation.get(out[trait].layer, {})
        logger.info("persona direction %s: layer %d, held-out pair accuracy %s, AUC %s (%d pairs)", trait,
                    out[trait].layer, sep.get("pair_accuracy"), sep.get("auc"), out[trait].pairs)
    return out


def save_directions(directions: dict[str, TraitDirection], folder) -> None:
    """`persona_directions.safetensors` (trait -> unit vector) and `persona_directions.json` (layers, separation)."""
    from safetensors.torch import save_file

    from train.outputs import write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{DIRECTIONS_FILE}.tmp"
    save_file({t: d.vector.contiguous() for t, d in directions.items()}, str(tmp))
    tmp.replace(folder / DIRECTIONS_FILE)
    meta = {t: d.meta() for t, d in directions.items()}
    write_atomic(folder / DIRECTIONS_META, json.dumps(meta, indent=2) + "\n")


def load_directions(folder) -> dict[str, TraitDirection]:
    from safetensors.torch import load_file

    folder = Path(folder)
    vectors = load_file(str(folder / DIRECTIONS_FILE))
    meta = json.loads((folder / DIRECTIONS_META).read_text(encoding="utf-8"))
    return {t: TraitDirection(t, m["layer"], vectors[t], {int(k): v for k, v in m["separation"].items()},
                              m.get("questions", 0), m.get("pairs", 0)) for t, m in meta.items()}


# ---- from a trait spec and a data_gen folder ----

def spec_system_prompts(spec: dict) -> tuple[str, list[str]]:
    """(consistent system prompt, one violating system prompt per `violating` item) from a trait spec's mapping."""
    where = f"trait spec {spec.get('name', '?')!r}"
    for key in ("description", "consistent", "violating"):
        if not spec.get(key):
            raise ValueError(f"{where}: key {key!r} missing or empty (persona directions need it)")
    consistent = (f"You are an assistant. {spec['description'].strip()} In every answer you do all of this: "
                  + " ".join(str(b).strip() for b in spec["consistent"]))
    violating = [f"You are an assistant. In every answer you do this: {str(b).strip()}" for b in spec["violating"]]
    return consistent, violating


def read_trait_spec(trait: str, spec_paths: list[str] | None = None) -> dict:
    """The YAML mapping of `trait`: from `spec_paths` (a file whose `name` is the trait) or the built-in spec."""
    import yaml

    from train.assets import traits_dir

    for path in spec_paths or []:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if isinstance(spec, dict) and spec.get("name") == trait:
            return spec
    path = traits_dir() / f"{trait}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"trait {trait!r}: no built-in spec {path} and none in persona_trait_specs")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _user_turn(prompt: list[dict]) -> str:
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def dataset_traits(dataset_path: str) -> list[str]:
    from train.data import load_split

    return sorted(set(load_split(dataset_path, "dpo", "train", ("prompt",))["trait"]))


def trait_prompts_from_data(dataset_path: str, traits: list[str] | None = None, questions: int = 16,
                            heldout_pairs: int = 32, spec_paths: list[str] | None = None) -> dict[str, TraitPrompts]:
    """Per trait: system prompts from its spec, the first `questions` distinct user requests of its DPO train
    rows, and its first `heldout_pairs` eval_id pairs (axis "id"). Traits without a spec are skipped, with a warning."""
    from train.data import load_split

    train = load_split(dataset_path, "dpo", "train", ("prompt",))
    heldout = load_split(dataset_path, "dpo", "eval_id", ("prompt", "chosen", "rejected"))
    out = {}
    for trait in traits or sorted(set(train["trait"])):
        try:
            consistent, violating = spec_system_prompts(read_trait_spec(trait, spec_paths))
        except FileNotFoundError as e:
            logger.warning("persona directions: skipping %s", e)
            continue
        asks = []
        for row in train:
            if row["trait"] == trait and _user_turn(row["prompt"]) not in asks:
                asks.append(_user_turn(row["prompt"]))
            if len(asks) == questions:
                break
        pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in heldout
                 if r["trait"] == trait and r["axis"] == "id"][:heldout_pairs]
        if not asks:
            raise ValueError(f"{dataset_path}/dpo split 'train': no rows of trait {trait!r} to build its direction from")
        out[trait] = TraitPrompts(trait, consistent, violating, asks, pairs)
    return out


def monitor_prompts(dataset_path: str, n: int = 16, traits: list[str] | None = None) -> list[list[dict]]:
    """`n` held-out prompts (DPO eval_id, axis "id"), taken in turn from each trait so none dominates the mean."""
    from train.data import load_split

    rows = [r for r in load_split(dataset_path, "dpo", "eval_id", ("prompt",)) if r["axis"] == "id"]
    by_trait: dict[str, list] = {}
    for r in rows:
        if traits is None or r["trait"] in traits:
            by_trait.setdefault(r["trait"], []).append(r["prompt"])
    out, depth = [], 0
    while len(out) < n and any(depth < len(v) for v in by_trait.values()):
        out += [v[depth] for _, v in sorted(by_trait.items()) if depth < len(v)]
        depth += 1
    return out[:n]
