"""The teacher generator's recipe keys, in a module of their own so both generators can read them.

The offline generator (generate.py) accepts them in a shared recipe file and ignores them; the teacher
(teacher.py) runs the offline generator for its eval splits. Keeping the keys here lets teacher.py import
generate.py without generate.py importing teacher.py back.
"""

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class TeacherConfig:
    """Teacher-LLM generation over an OpenAI-compatible chat endpoint (used by `python -m data_gen teacher`)."""

    teacher_backend: Literal["openai", "transformers"] = field(default="openai", metadata={
        "help": "'openai': any OpenAI-compatible HTTP endpoint; 'transformers': teacher_model/student_model are "
                "local models (a path, a Hub id, or smollm2-135m-instruct), generated in this process."})
    teacher_base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"pattern": r"https?://.+",
        "help": "OpenAI-compatible base URL (ending in /v1); POSTs go to <base>/chat/completions."})
    teacher_model: str = field(default="", metadata={"help": "Teacher model name, sent as 'model'."})
    teacher_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Name of the environment variable holding the API key (unset: no Authorization header)."})
    student_base_url: Optional[str] = field(default=None, metadata={"help": "Student endpoint (default: the teacher's)."})
    student_model: Optional[str] = field(default=None, metadata={"help": "Student model (default: the teacher model)."})
    teacher_prompts_jsonl: Optional[str] = field(default=None, metadata={
        "help": "JSONL of {trait, prompt} rows to answer (default: the offline generator's train prompts)."})
    critique_and_revise: bool = field(default=True, metadata={"help": "Critique and revise each teacher answer."})
    max_concurrency: int = field(default=8, metadata={"min": 1, "help": "Requests in flight at once."})
    max_retries: int = field(default=5, metadata={"min": 0,
        "help": "Retries per request on 429, 5xx, timeouts and broken responses."})
    backoff_s: float = field(default=1.0, metadata={"min": 0, "help": "First retry delay; doubles on each retry."})
    request_timeout_s: float = field(default=60.0, metadata={
        "help": "Total time allowed per request attempt (not per read)."})
    max_tokens: int = field(default=512, metadata={"min": 1, "help": "max_tokens per completion."})
    temperature: float = field(default=0.7, metadata={"min": 0, "help": "Sampling temperature."})
    cache_path: Optional[str] = field(default=None, metadata={
        "help": "Response cache (JSONL); default <output_dir>/teacher_cache.jsonl."})
