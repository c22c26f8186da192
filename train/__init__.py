"""Training (`python -m train.sft`, `python -m train.dpo`) and the shared kernel the other stages build on.

The stages are data_gen -> train -> eval. `train/` never imports `data_gen` or `eval`; they may import these
kernel modules of `train/` and no others (tests/test_layers.py checks both):

- `assets`: where files live (data inside installed packages, the built-in trait specs, a data folder's record
  files) and the MiniLM sentence embedder.
- `contract`: the data contract: columns, features and allowed values of the datasets.
- `chat_endpoint`: the OpenAI-compatible HTTP client (retries, Retry-After, deadlines, no redirects).
- `models`: embedded model names, model and tokenizer loading; `tiny_model`: the tiny random test model.
- `chat_template`: the chat templates training renders with, and checks of a template's rendering.
- `recipe`: YAML recipes checked against their dataclasses.
- `hardware`: the process set-up (OpenMP, allocator, threads) and the device and precision to run on.
- `outputs`: what a training run leaves in its output_dir (manifest names, file hashes).
- `tracking`: W&B runs and artifacts for every stage.

Everything else here (`sft`, `dpo`, `run`, `data`, `loss_mask`, `speedups`, `shared_prompt`, `unpadded_mlp`,
`fused_lora`, `fused_attention`, `fused_rms_norm`, `label_only_head`, `token_log_probs`, `publish`, ...) is
training's own.
"""

KERNEL = ("assets", "contract", "chat_endpoint", "models", "tiny_model", "chat_template", "recipe", "hardware",
          "outputs", "tracking")
