"""`python -m jaxgpt.serve`: a run or export loaded, warmed up and served by uvicorn (main), the
command's config (ServeCommand), and a server that drains on SIGTERM (draining_server).

    python -m jaxgpt.serve RUN_OR_EXPORT [serve.host=127.0.0.1 serve.port=8000 serve.slots=4
                                          serve.api_key=KEY sample.temperature=0.8 screen.* ...]

    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}'

The API key is serve.api_key or the JAXGPT_API_KEY environment variable; without one the server is
open, which is why it listens on 127.0.0.1 unless told otherwise. SIGTERM drains: requests in
flight finish, new ones get 503, then the server exits. The API itself: jaxgpt.serve.app.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from jaxgpt import cli
from jaxgpt.config import Config
from jaxgpt.errors import ConfigError
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen
from jaxgpt.generate.service import Service
from jaxgpt.model.gpt import GPT
from jaxgpt.serve.admission import Admission
from jaxgpt.serve.app import make_app
from jaxgpt.serve.feedback import Feedback, default_path
from jaxgpt.serve.openai_api import ApiError
from jaxgpt.serve.state import ServeConfig
from jaxgpt.store import runs

if TYPE_CHECKING:
    import uvicorn


@dataclass(frozen=True)
class ServeCommand(Config):
    """The run's sections (sample, screen, model.dtype ...) plus the server's own."""
    serve: ServeConfig = field(default_factory=ServeConfig)


def draining_server(app: FastAPI, config,
                    drain_timeout_s: float = ServeConfig.drain_timeout_s) -> "uvicorn.Server":
    """A uvicorn server whose first SIGTERM or Ctrl-C drains: new requests get 503 (and /health
    says "draining") while those in flight finish, for at most drain_timeout_s; then it exits as
    uvicorn does. A second signal exits at once."""
    import uvicorn

    admission: Admission = app.state.admission

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if admission.draining:
                return super().handle_exit(sig, frame)
            admission.drain()
            print(f"jaxgpt serve: {signal.Signals(sig).name}: draining {admission.count} requests "
                  "in flight", file=sys.stderr, flush=True)

            def wait_then_exit() -> None:
                deadline = time.monotonic() + drain_timeout_s
                while admission.count and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.should_exit = True  # not handle_exit: uvicorn would re-raise the signal
            threading.Thread(target=wait_then_exit, name="jaxgpt-drain", daemon=True).start()
    return DrainingServer(config)


def uvicorn_config(app: FastAPI, **settings) -> "uvicorn.Config":
    """uvicorn's config for `app`, with h11 answering what is not HTTP in OpenAI's shape."""
    import uvicorn  # here, so that importing this module does not need it
    return uvicorn.Config(app, http=openai_shaped_h11(), **settings)


def openai_shaped_h11() -> type:
    """uvicorn's h11 protocol, its answer to a request it cannot parse (a malformed request line,
    header or chunk, headers past 16 KB) a 400 in OpenAI's shape instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class OpenAIShapedH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(ApiError(400, f"the request is not valid HTTP/1.1 ({msg})",
                                       code="invalid_http").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(body)).encode())]
            try:
                for event in (h11.Response(status_code=400, headers=headers, reason="Bad Request"),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response was under way: nothing more can be said
                pass
            self.transport.close()
    return OpenAIShapedH11


def model_id_of(source: str) -> str:
    """A run's directory name ("out/shakespeare/export" -> "shakespeare")."""
    path = Path(source).absolute()
    return path.parent.name if path.name == "export" else path.name


def checked(cfg: ServeConfig) -> ServeConfig:
    for key, ok in (("port", 0 <= cfg.port < 65536), ("slots", cfg.slots >= 1),
                    ("max_body_bytes", cfg.max_body_bytes > 0), ("max_queue", cfg.max_queue >= 0),
                    ("retry_after_s", cfg.retry_after_s >= 0),
                    ("drain_timeout_s", cfg.drain_timeout_s >= 0)):
        if not ok:
            raise ConfigError(f"serve.{key}={getattr(cfg, key)} is out of range")
    return cfg


def serve(operands: list[str], settings: list[str]) -> None:
    """The command: RUN_OR_EXPORT loaded, both kinds of step compiled, then served until stopped."""
    cfg = checked(cli.tool_config(ServeCommand, settings).serve)  # every key checked
    loaded = runs.load(operands[0], [s for s in settings if not s.lstrip("-").startswith("serve.")])
    cfg = dataclasses.replace(cfg, api_key=cfg.api_key or os.environ.get("JAXGPT_API_KEY") or None,
                              model_name=cfg.model_name or model_id_of(operands[0]))
    tokenizer = loaded.tokenizer
    engine = Engine(GPT(loaded.cfg.model), loaded.params, tokenizer, slots=cfg.slots)
    feedback_db = Path(cfg.feedback_db or default_path(operands[0]))
    with (Feedback(feedback_db) if cfg.feedback else contextlib.nullcontext()) as feedback, \
            Service(engine, tokenizer, Screen(loaded.cfg.screen)) as service:  # closed first
        defaults = SamplingParams.from_config(loaded.cfg.sample, n=1)
        service.warm_up(loaded.cfg.sample.system, top_logprobs=(0, 1), params=defaults)
        app = make_app(service, tokenizer, cfg, cfg.model_name, defaults, feedback)
        print(f"jaxgpt serve: {loaded.where} (step {loaded.step}, context "
              f"{loaded.cfg.model.seq_len} tokens) as {cfg.model_name!r} on "
              f"http://{cfg.host}:{cfg.port}/v1{'' if cfg.api_key else ' (no API key)'}; "
              f"feedback: {feedback_db if feedback else 'off'}", flush=True)
        config = uvicorn_config(app, host=cfg.host, port=cfg.port, log_level="info")
        draining_server(app, config, cfg.drain_timeout_s).run()


def main(argv: list[str] | None = None) -> None:
    cli.run("python -m jaxgpt.serve", cli.Command(
        serve, usage="RUN_OR_EXPORT [serve.port=8000 serve.slots=4 serve.api_key=KEY "
                     "sample.temperature=0.8 ...]",
        root=ServeCommand, sections=("serve", "sample", "screen", "model")), argv)


if __name__ == "__main__":
    main()
