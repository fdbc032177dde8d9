"""What the server's handlers share: its settings (ServeConfig, the `serve` section of
`python -m jaxgpt.serve`) and the objects one app holds (AppState, in app.state.serve)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.service import Service
from jaxgpt.serve.admission import Admission
from jaxgpt.serve.feedback import Feedback
from jaxgpt.serve.metrics import Metrics


@dataclass(frozen=True)
class ServeConfig:
    """`python -m jaxgpt.serve`: where to listen and how much to take on."""
    host: str = "127.0.0.1"          # 0.0.0.0 to listen on every interface (set an api_key then)
    port: int = 8000
    slots: int = 4                   # requests (samples) decoding together; also the largest n
    api_key: str | None = None       # clients send `Authorization: Bearer KEY`; or $JAXGPT_API_KEY
    max_body_bytes: int = 1_000_000  # a larger request body is refused with 413
    max_queue: int = 64              # requests waiting beyond the slots before new ones get 429
    model_name: str = ""             # the model id clients name; default: the run directory's name
    retry_after_s: int = 1           # the Retry-After of a 429 (queue full) or 503 (draining)
    drain_timeout_s: float = 120.0   # on SIGTERM, how long requests in flight may take to finish
    feedback: bool = True            # record "store": true chat completions, take POST /v1/feedback
    feedback_db: str = ""            # the SQLite file; default: feedback.db in the run directory


@dataclass
class AppState:
    """One app's service and settings, and what it keeps while serving."""
    service: Service
    tokenizer: Tokenizer
    cfg: ServeConfig
    model_id: str
    defaults: SamplingParams         # fills the sampling fields a request leaves out
    feedback: Feedback | None        # None: nothing recorded, POST /v1/feedback is a 404
    admission: Admission
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))  # the model's, for /v1/models

    @property
    def seq_len(self) -> int:
        return self.service.engine.model.cfg.seq_len


def state_of(request: Request) -> AppState:
    return request.app.state.serve
