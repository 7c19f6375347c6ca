"""Serve a GGUF with llama.cpp's OpenAI-compatible HTTP server (``llama-cpp-python[server]``).

Any graph the exporter writes is served: ``bitnet`` for SubLN students, the native ``llama`` / ``qwen2`` / ``qwen3``
for ``subln: none`` students, each with its LRC adapter (``--lora``) when the student has one. A GGUF the project did
not write (a user's own model) is served too, with a warning that its integrity is unchecked.

:func:`serve` validates the file with our reader first (a truncated or corrupted GGUF is a one-line error, not
a crash inside llama.cpp), then builds the app exactly as ``python -m llama_cpp.server`` does
(``llama_cpp.server.app.create_app`` + ``uvicorn.run``) in this process, so the server's PID is the PID of
``bitdistill serve``. Endpoints: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ...
"""

from __future__ import annotations

from pathlib import Path

from bitnet.export.errors import GGUFFormatError
from bitnet.export.reader import field_value, read_gguf_checked


class ServerUnavailableError(RuntimeError):
    """llama-cpp-python's server extra is not installed."""


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
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise ServerUnavailableError(f"serving needs llama-cpp-python[server] ({e.name} is missing)") from e
    server_settings = ServerSettings(host=host, port=port)
    model_settings = ModelSettings(
        model=str(model),
        model_alias=alias or model.stem,
        n_ctx=n_ctx,
        lora_path=str(lora) if lora is not None else None,
        verbose=False,
        **({"n_threads": n_threads, "n_threads_batch": n_threads} if n_threads else {}),
    )
    app = create_app(server_settings=server_settings, model_settings=[model_settings])
    uvicorn.run(app, host=host, port=port, log_level="warning")
