"""The training forward's speed-ups as recipe choices (`auto|on|off`, like TRL's `loss_type`), resolved at run start.

- `label_only_head`: score only labelled positions (`train.label_only_head`); `auto`: on CPU, where TRL's fused head
  has no Triton kernel and scores every position.
- `shared_prompt`: DPO computes each pair's prompt once for both completions (`train.shared_prompt`); `auto`: in DPO
  with the label-only head and no gradient checkpointing.
- `unpadded_mlp`: MLPs on real tokens only (`train.unpadded_mlp`); `auto`: with the label-only head and no gradient
  checkpointing.
- `keep_freed_memory`: glibc keeps freed memory for reuse (`train.hardware.keep_freed_memory`); `auto`: on CPU.
- `fused_lora`: each LoRA linear layer as one autograd node (`train.fused_lora`); `auto`: on CPU, where PEFT's
  per-layer casts and small ops cost more than the rank-r matmuls.
- `fused_rms_norm`: each RMSNorm as one autograd node with a hand-written backward (`train.fused_rms_norm`); `auto`:
  on CPU, where the norms' many small ops and their fp32 intermediates cost more than their arithmetic.
- `fused_attention`: a model running eager attention switches to the same attention as one autograd node, without
  repeating key/value heads (`train.fused_attention`); `auto`: on CPU (eager is the CPU recipes' choice).
- `bf16_base`: the frozen base weights loaded in bf16 when training runs under bf16 autocast (LoRA weights and
  optimizer state stay fp32); `auto` (the default): on CPU, where autocast would otherwise re-cast every weight in
  every op.

`auto` uses a speed-up where it applies and says why not where it does not; `on` where it cannot apply stops the run
before training; `off` never uses it. What was used, and why, goes to the run manifest (`record`).
"""

import dataclasses
import logging

logger = logging.getLogger(__name__)

CHOICES = ("auto", "on", "off")
NAMES = ("label_only_head", "shared_prompt", "unpadded_mlp", "keep_freed_memory", "fused_lora", "fused_rms_norm",
         "fused_attention", "bf16_base")


class SpeedupError(ValueError):
    """A speed-up set to `on` that cannot apply to this run; the message names the recipe key."""


@dataclasses.dataclass
class Choice:
    asked: str
    used: bool
    why: str
    check: str | None = None  # what the first-batch self-check found (label_only_head, shared_prompt)


def _choose(name: str, asked: str, problem: str | None, why_used: str) -> Choice:
    """`problem`: why the speed-up cannot apply (None: it can)."""
    if asked not in CHOICES:
        raise SpeedupError(f"{name}: {asked!r} is not one of {', '.join(CHOICES)}")
    if asked == "off":
        return Choice(asked, False, "off in the recipe")
    if problem is None:
        return Choice(asked, True, why_used if asked == "auto" else "on in the recipe")
    if asked == "on":
        raise SpeedupError(f"{name}: on, but it cannot apply to this run: {problem}. Set {name}: auto or off")
    return Choice(asked, False, problem)


def resolve(stage: str, script_args, training_args, model_args=None) -> dict[str, Choice]:
    """Each speed-up's choice for this run, from the recipe's `auto|on|off`, the device and the installed TRL.

    Model-dependent limits (a head with a bias, scaled logits) are checked when the trainer exists (`install`).
    """
    from train.hardware import malloc_problem
    from train.label_only_head import trl_hook_problem

    device = training_args.device.type
    checkpointing = training_args.gradient_checkpointing
    asked = {name: getattr(script_args, name, "auto") for name in NAMES}

    problem, version_warning = trl_hook_problem()
    if problem is None and asked["label_only_head"] == "auto":
        if device != "cpu":
            problem = f"{device}: TRL's fused head is the fast one there"
        elif version_warning:
            problem = f"the label-only head is {version_warning}: TRL's head"
    elif problem is None and version_warning and asked["label_only_head"] == "on":
        logger.warning("label_only_head: on, %s", version_warning)
    choices = {"label_only_head": _choose("label_only_head", asked["label_only_head"], problem,
                                          "cpu: TRL's head scores every position there")}
    head = choices["label_only_head"].used

    def needs_head(what):
        if not head:
            return f"it runs inside the label-only head, which is not used ({choices['label_only_head'].why})"
        if checkpointing:
            return "gradient_checkpointing is on (recomputation would run outside it)"
        return None if what is None else what

    choices["shared_prompt"] = _choose("shared_prompt", asked["shared_prompt"],
                                       needs_head("sft has no pairs" if stage != "dpo" else None),
                                       "dpo: each pair's prompt once for both completions")
    choices["unpadded_mlp"] = _choose("unpadded_mlp", asked["unpadded_mlp"], needs_head(None),
                                      "padding skipped in the MLPs")
    malloc = malloc_problem()
    if malloc is None and device != "cpu" and asked["keep_freed_memory"] == "auto":
        malloc = f"{device}: the large tensors live in device memory"
    choices["keep_freed_memory"] = _choose("keep_freed_memory", asked["keep_freed_memory"], malloc,
                                           "cpu: large freed blocks are reused, not page-faulted in every step")
    fused = f"{device}: written for CPU autocast (PEFT's forward is the fast one there)" if device != "cpu" else None
    choices["fused_lora"] = _choose("fused_lora", asked["fused_lora"], fused,
                                    "cpu: one autograd node per LoRA layer, no input casts")
    not_cpu = f"{device}: written for CPU (the GPU's kernels are not the bottleneck there)" if device != "cpu" else None
    choices["fused_rms_norm"] = _choose("fused_rms_norm", asked["fused_rms_norm"], not_cpu,
                                        "cpu: one autograd node per RMSNorm, no fp32 intermediates kept")
    # Under checkpointing a first call whose check fails saves other tensors than its recomputation
    attention = not_cpu or ("gradient_checkpointing is on (the recomputation must repeat the first call's check)"
                         if checkpointing else None)
    choices["fused_attention"] = _choose("fused_attention", asked["fused_attention"], attention,
                                         "cpu: eager attention as one autograd node, no key/value repeats")
    base = None
    dtype = str(getattr(model_args, "dtype", "float32"))
    if not getattr(training_args, "bf16", False):
        base = "training is not under bf16 autocast"
    elif model_args is None or getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
        base = "the base is quantized" if model_args is not None else "no model arguments"
    elif dtype not in ("float32", "torch.float32"):
        base = f"the recipe loads the base in {dtype}"
    elif device != "cpu" and asked["bf16_base"] == "auto":
        base = f"{device}: the recipe's dtype decides there"
    choices["bf16_base"] = _choose("bf16_base", asked["bf16_base"], base,
                                   "cpu bf16 autocast: base weights stored in bf16, not re-cast in every op")
    return choices


def base_dtype(choices: dict[str, Choice], model_args) -> str:
    """The dtype the base model loads in."""
    return "bfloat16" if choices["bf16_base"].used else model_args.dtype


def install(trainer, choices: dict[str, Choice]) -> list:
    """Apply the chosen speed-ups to `trainer`'s models (policy and DPO's reference). Returns the installed parts that
    check themselves on the first batch (label-only heads, fused attention): `record` reads their `checks`.

    A model the label-only head cannot reproduce keeps TRL's head (`on`: SpeedupError).
    """
    from peft import PeftModel

    from train import fused_attention
    from train.fused_lora import FusedLora
    from train.fused_rms_norm import FusedRMSNorm
    from train.hardware import keep_freed_memory
    from train.label_only_head import LabelOnlyHead, model_problem

    heads = []
    head = choices["label_only_head"]
    for model in (trainer.model, getattr(trainer, "ref_model", None)) if head.used else ():
        if model is None:
            continue
        model = trainer.accelerator.unwrap_model(model)
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        problem = model_problem(model)
        if problem:
            if head.asked == "on":
                raise SpeedupError(f"label_only_head: on, but it cannot apply to this model: {problem}. "
                                   "Set label_only_head: auto or off")
            logger.warning("Keeping TRL's LM head (%s): training runs slower on CPU", problem)
            for name in ("label_only_head", "shared_prompt", "unpadded_mlp"):
                if choices[name].used:
                    choices[name] = Choice(choices[name].asked, False, f"keeping TRL's head: {problem}")
            continue
        outputs = ("entropy", "mean_logits", "is_top1")
        if getattr(trainer, "use_weighting", False):
            outputs += ("log_sum_sq_probs",)
        heads.append(LabelOnlyHead(
            model, outputs, shared_prompt=choices["shared_prompt"].used, unpad_mlp=choices["unpadded_mlp"].used,
            head_required=head.asked == "on", prompt_required=choices["shared_prompt"].asked == "on",
        ).install())
    if choices["keep_freed_memory"].used and not keep_freed_memory():
        raise SpeedupError("keep_freed_memory: glibc refused the mallopt settings")
    model = trainer.accelerator.unwrap_model(trainer.model)
    if choices["fused_lora"].used:
        fused = FusedLora(model)
        if not fused.wrapped:
            _cannot_apply(choices, "fused_lora",
                          "no LoRA layer it can take (dropout, DoRA or a quantized base keep PEFT's forward)")
        else:
            choices["fused_lora"].why += f" ({fused.wrapped} layers)"
    if choices["fused_rms_norm"].used:
        norms = FusedRMSNorm(model)
        if not norms.wrapped:
            _cannot_apply(choices, "fused_rms_norm", "no RMSNorm it reproduces exactly"
                          + "".join(f"; {k}: {v}" for k, v in norms.skipped.items()))
        else:
            kept = "".join(f"; kept {k} ({v})" for k, v in norms.skipped.items())
            choices["fused_rms_norm"].why += f" ({norms.wrapped} norms{kept})"
    if choices["fused_attention"].used:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        problem = fused_attention.problem(base)
        if problem is None:
            try:
                heads.append(fused_attention.FusedAttention(base))
            except (ValueError, NotImplementedError) as error:  # a model that refuses registered attention functions
                problem = f"the model refused it: {error}"
        if problem:
            _cannot_apply(choices, "fused_attention", problem)
    return heads


def _cannot_apply(choices: dict[str, Choice], name: str, problem: str):
    """A speed-up found at install not to apply to this model: `on` stops the run, `auto` records why."""
    if choices[name].asked == "on":
        raise SpeedupError(f"{name}: on, but {problem}. Set {name}: auto or off")
    choices[name] = Choice(choices[name].asked, False, problem)


def record(choices: dict[str, Choice], heads=()) -> dict:
    """The manifest's account of the forward that trained the adapter: asked, used, why, and the self-checks."""
    out = {name: dataclasses.asdict(choice) for name, choice in choices.items()}
    for head in heads:
        for name, result in head.checks.items():
            out[name]["check"] = result
            if result.startswith("fell back"):
                out[name]["used"] = False
    return out


def summary(choices: dict[str, Choice]) -> str:
    return "; ".join(f"{name} {'on' if c.used else 'off'} ({c.why})" for name, c in choices.items())


def apply(trainer, **asked) -> tuple[dict[str, Choice], list]:
    """Resolve and install on a trainer made outside the training scripts (tests, benchmarks): (choices, heads).

    `asked`: name -> "auto" | "on" | "off" (default auto).
    """
    import types

    from trl import DPOTrainer

    stage = "dpo" if isinstance(trainer, DPOTrainer) else "sft"
    choices = resolve(stage, types.SimpleNamespace(**asked), trainer.args)
    return choices, install(trainer, choices)
