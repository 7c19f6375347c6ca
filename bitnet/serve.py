"""Serve a GGUF with llama.cpp's OpenAI-compatible HTTP server (``llama-cpp-python[server]``).

Any graph the exporter writes is served: ``bitnet`` for SubLN students, the native ``llama`` / ``qwen2`` / ``qwen3``
for ``subln: none`` students, each with its LRC adapter (``--lora``) when the student has one. A GGUF the project did
not write (a user's own model) is served too, with a warning that its integrity is unchecked.

:func:`serve` validates the file with our reader first (a truncated or corrupted GGUF is a one-line error, not
a crash inside llama.cpp), then builds the app exactly as ``python -m llama_cpp.server`` does
(``llama_cpp.server.app.create_app`` + ``uvicorn.run``) in this process, so the server's PID is the PID of
``bitdistill serve``. Endpoints: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ...

Before the model loads, the port is checked (a busy port is a one-line error in a second, not after the load).
Requests are checked before they reach llama-cpp-python's handlers (:func:`guard_requests`): a body that is not JSON,
not an object, or does not fit the endpoint's request schema is answered ``400`` with a one-line reason and no
internals (llama-cpp-python answers those ``500`` with the exception text). Authentication: with
``BITDISTILL_SERVE_API_KEY`` set, every request needs ``Authorization: Bearer <key>`` (llama-cpp-python's
``api_key``, 401 otherwise); for anything beyond one trusted network put a TLS reverse proxy in front
(docs/export.md, "Serving").
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from bitnet.export.errors import GGUFFormatError
from bitnet.export.reader import field_value, read_gguf_checked

API_KEY_ENV = "BITDISTILL_SERVE_API_KEY"


class ServerUnavailableError(RuntimeError):
    """llama-cpp-python's server extra is not installed, or the address cannot be bound."""


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` once (as uvicorn will) and release it; a one-line error when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerUnavailableError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}") from e


def _bad_request(message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=400)


def guard_requests(app: Any) -> Any:
    """Answer malformed requests to the JSON endpoints with 400 and a one-line reason before llama-cpp-python sees
    them (its handlers turn them into 500s that carry the exception text)."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest, CreateEmbeddingRequest
    from pydantic import ValidationError

    schemas = {"/v1/completions": CreateCompletionRequest, "/v1/chat/completions": CreateChatCompletionRequest,
               "/v1/embeddings": CreateEmbeddingRequest}

    @app.middleware("http")
    async def reject_malformed(request: Any, call_next: Any) -> Any:
        schema = schemas.get(request.url.path)
        if request.method != "POST" or schema is None:
            return await call_next(request)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _bad_request("the request body is not valid JSON")
        if not isinstance(body, dict):
            return _bad_request("the request body must be a JSON object")
        try:
            schema.model_validate(body)
        except ValidationError as e:
            problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:3]]
            return _bad_request("; ".join(problems))
        return await call_next(request)

    return app


def serve(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    lora: str | Path | None = None,
    n_ctx: int = 1024,
    n_threads: int | None = None,
    alias: str | None = None,
) -> None:
    """Run the server until interrupted (blocks)."""
    model = Path(model)
    base = read_gguf_checked(model)
    if lora is not None:
        reader = read_gguf_checked(lora)
        field = reader.get_field("general.type")
        if field is None or field.contents() != "adapter":
            raise GGUFFormatError(f"{lora} is not a LoRA adapter GGUF (general.type != 'adapter')")
        arch, lora_arch = (field_value(r, "general.architecture") for r in (base, reader))
        if arch != lora_arch:
            raise GGUFFormatError(f"{lora} is an adapter for llama.cpp {lora_arch!r}, but {model} is {arch!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    check_port(host, port)
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise ServerUnavailableError(f"serving needs llama-cpp-python[server] ({e.name} is missing)") from e
    server_settings = ServerSettings(host=host, port=port, api_key=os.environ.get(API_KEY_ENV) or None)
    model_settings = ModelSettings(
        model=str(model),
        model_alias=alias or model.stem,
        n_ctx=n_ctx,
        lora_path=str(lora) if lora is not None else None,
        verbose=False,
        **({"n_threads": n_threads, "n_threads_batch": n_threads} if n_threads else {}),
    )
    app = guard_requests(create_app(server_settings=server_settings, model_settings=[model_settings]))
    uvicorn.run(app, host=host, port=port, log_level="warning")
