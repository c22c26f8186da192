"""Read an offline W&B run (`offline-run-*/run-<id>.wandb`) back: what `wandb sync` would upload."""

import json
import time
from pathlib import Path


def records(path: Path):
    """Records of a W&B transaction log: LevelDB-style log, 32 KiB blocks, 7-byte headers."""
    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def _parsed(log: Path, timeout: float):
    """The log's records once its `exit` record is there: W&B's service process may still be flushing after
    `run.finish()` returns."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.time() + timeout
    while True:
        parsed = []
        for raw in records(log):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            parsed.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or time.time() > deadline:
            return parsed
        time.sleep(0.2)


def read_run(run_dir: Path, timeout: float = 30) -> dict:
    """id, group, name, job_type, config, summary (JSON-decoded), artifacts (name -> type/digest/files) of one run."""
    out = {"config": {}, "summary": {}, "artifacts": {}, "files": []}
    (log,) = run_dir.glob("run-*.wandb")
    for record in _parsed(log, timeout):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(id=r.run_id, group=r.run_group, name=r.display_name, job_type=r.job_type)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            a = record.artifact
            out["artifacts"][a.name] = {"type": a.type, "digest": a.digest, "metadata": json.loads(a.metadata or "{}"),
                                        "files": sorted(e.path for e in a.manifest.contents)}
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
    return out


def read_runs(wandb_dir: Path) -> dict:
    """Every offline run under `wandb_dir`, by job type (a job type seen twice keeps a list)."""
    runs = {}
    for run_dir in sorted(Path(wandb_dir).glob("offline-run-*")):
        run = read_run(run_dir)
        runs.setdefault(run["job_type"], []).append(run)
    return runs
