"""The dataset as the Hub gets it: a card `huggingface_hub` reads, the exact upload folder loading back with
`datasets`, a push against a local 127.0.0.1 server (one that works, one that fails), and the data stage's W&B run."""

import base64
import http.server
import json
import threading
from pathlib import Path

import pytest
from wandb_records import read_runs

from data_gen.card import SIZE_CATEGORIES
from data_gen.generate import hub_folder, main, push
from train.assets import PUSHED, RECORD, pushed_dataset_id, read_record

SMALL = ["--sft_train_per_trait", "6", "--dpo_train_per_trait", "8", "--eval_id_per_trait", "4",
         "--eval_ood_per_axis_per_trait", "4", "--leakage_embedding_check", "false", "--diversity_sample", "20"]
SPLITS = ("train", "eval_id", "eval_ood")


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "data"
    main(["--output_dir", str(out), *SMALL])
    return out


def test_card_metadata_is_the_hubs_own(data):
    from huggingface_hub import DatasetCard, DatasetCardData

    card = DatasetCard.load(data / "README.md")
    meta = card.data.to_dict()
    standard = set(DatasetCardData().to_dict()) | {"configs", "tags", "license", "language", "pretty_name",
                                                    "task_categories", "size_categories"}
    assert set(meta) <= standard, f"non-standard front matter keys: {set(meta) - standard}"
    assert meta["size_categories"] == ["n<1K"] and "n>1M" not in [c for _, c in SIZE_CATEGORIES]
    # What the configs name is exactly what is there to upload.
    named = {f["path"] for c in meta["configs"] for f in c["data_files"]}
    assert named == {f"jsonl/{k}_{s}.jsonl" for k in ("sft", "dpo") for s in SPLITS}
    record = read_record(data)
    assert record["seed"] == 0 and record["split_sizes"]["dpo"]["train"] == 3 * 8


def test_the_upload_folder_loads_back_with_datasets(data, tmp_path):
    from datasets import load_dataset

    folder = hub_folder(data, tmp_path / "upload")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(
        ["README.md", RECORD] + [f"jsonl/{k}_{s}.jsonl" for k in ("sft", "dpo") for s in SPLITS])
    for kind in ("sft", "dpo"):
        loaded = load_dataset(str(folder), kind)
        assert list(loaded) == list(SPLITS), kind
        for split in SPLITS:
            assert loaded[split].to_list() == jsonl_rows(data / "jsonl" / f"{kind}_{split}.jsonl"), (kind, split)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The endpoints `HfApi.create_repo` + `upload_folder` call, keeping the committed files (small files go inline)."""

    committed: dict = {}
    fail = False

    def log_message(self, *args):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(500 if self.fail else 200, [] if "/tree/" in self.path else {})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        host = self.headers["Host"]
        if self.fail:
            return self._send(500, {"error": "internal error"})
        if self.path.endswith("/repos/create"):
            return self._send(200, {"url": f"http://{host}/datasets/me/persona-data"})
        if self.path.endswith("/validate-yaml"):
            return self._send(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.committed[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            return self._send(200, {"commitUrl": f"http://{host}/datasets/me/persona-data/commit/{'a' * 40}",
                                    "commitOid": "a" * 40})
        self._send(404, {})


@pytest.fixture
def fake_hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read once, at import
    FakeHub.committed, FakeHub.fail = {}, False
    yield FakeHub
    server.shutdown()


class Cfg:
    push_to_hub, hub_private = "me/persona-data", True


def test_push_commits_the_upload_folder_and_records_the_id(data, tmp_path, fake_hub):
    from datasets import load_dataset

    push(data, Cfg)
    pushed = tmp_path / "as-pushed"
    for rel, content in fake_hub.committed.items():
        (pushed / rel).parent.mkdir(parents=True, exist_ok=True)
        (pushed / rel).write_bytes(content)
    assert set(fake_hub.committed) == {p.relative_to(tmp_path / "u").as_posix() for p in
                                       hub_folder(data, tmp_path / "u").rglob("*") if p.is_file()}
    assert load_dataset(str(pushed), "dpo")["eval_ood"].to_list() == jsonl_rows(data / "jsonl" / "dpo_eval_ood.jsonl")
    assert pushed_dataset_id(data) == "me/persona-data"
    (data / PUSHED).unlink()


def test_failed_push_keeps_the_local_dataset(data, fake_hub):
    fake_hub.fail = True
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match=r"(?s)me/persona-data failed .*local dataset is complete"):
        push(data, Cfg)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    assert pushed_dataset_id(data) is None


def test_data_stage_logs_one_wandb_run_in_the_experiment_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "exp7" / "data"
    main(["--output_dir", str(out), "--wandb", "true", *SMALL])
    (run,) = read_runs(tmp_path / "exp7" / "wandb")["data"]
    assert run["group"] == "exp7" and run["name"] == "exp7/data"
    assert run["summary"]["rows/dpo/train"] == 24 and run["summary"]["leakage/exact"] == "passed"
    art = run["artifacts"]["exp7-data"]
    assert art["type"] == "dataset" and "jsonl/sft_train.jsonl" in art["files"] and "README.md" in art["files"]
    assert run["summary"]["artifact/exp7-data"] == art["digest"]
