"""`spinserve` command line: build, generate, serve (and the perf tools).

User errors (bad checkpoint, bad flags, a prompt that does not fit) print one line,
`error: ...`, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from pydantic import ValidationError

from spinserve.engines.errors import EngineError


def _settings(args: argparse.Namespace, **more):
    from spinserve.configs.settings import load_settings

    overrides = {
        "engine.device": getattr(args, "device", None),
        "engine.dtype": getattr(args, "dtype", None),
        "cache.page_size": getattr(args, "page_size", None),
        "engine.prefill_chunk_tokens": getattr(args, "prefill_chunk", None),
        **more,
    }
    return load_settings(getattr(args, "config", None), **overrides)


def resolve_engine_dir(engine: Path | None, settings) -> Path:
    if engine is not None:
        return engine
    from spinserve.engines.embedded import embedded_engine_dir

    return embedded_engine_dir(settings.cache_dir)


def cmd_build(args: argparse.Namespace) -> int:
    if args.random is not None:
        from spinserve.engines.random_engine import build_random_engine

        if args.dtype != "auto":
            raise ValueError("--dtype does not apply to --random (weights are made at load)")
        seed = 0 if args.seed is None else args.seed
        out = build_random_engine(args.random, args.output, seed=seed, page_size=args.page_size)
        print(f"random-weight engine ({args.random}, seed {seed}) written to {out}")
        return 0
    if args.seed is not None:
        raise ValueError("--seed applies to --random engines only")
    from spinserve.engines.build import build_engine

    out = build_engine(args.checkpoint, args.output, dtype=args.dtype, page_size=args.page_size)
    print(f"engine written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from spinserve.control.engine import LLMEngine
    from spinserve.control.stream_detokenizer import IncrementalDetokenizer
    from spinserve.runtime.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    settings = _settings(args)
    engine = LLMEngine(resolve_engine_dir(args.engine, settings), settings)
    prompt_ids = engine.encode(args.prompt, chat=args.chat)
    rid = uuid.uuid4().hex
    engine.add_request(rid, prompt_ids, params)
    detok = IncrementalDetokenizer(engine.tokenizer, params.stop)
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id != rid:
                continue
            text = detok.push(out.new_token_ids) + (detok.flush() if out.finished else "")
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from spinserve.control.server import run_server

    more = {"server.host": args.host, "server.port": args.port, "server.api_key": args.api_key}
    settings = _settings(args, **more)
    if args.engine is None and settings.server.model_name is None:
        from spinserve.engines.embedded import EMBEDDED_NAME

        settings = _settings(args, **more, **{"server.model_name": EMBEDDED_NAME})
    run_server(resolve_engine_dir(args.engine, settings), settings)
    return 0


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", type=Path, help="engine folder (default: embedded SmolLM2)")
    p.add_argument("--config", type=Path, help="TOML settings file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--page-size", type=int, choices=[8, 16, 32])
    p.add_argument("--prefill-chunk", type=int, help="longest prefill chunk in tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "build", help="checkpoint (HF folder or .gguf), or --random PRESET -> engine folder"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path)
    src.add_argument(
        "--random",
        metavar="PRESET",
        help="random weights of a real model shape, made at load, for perf runs "
        "(e.g. llama-3.1-8b; an unknown name lists the presets)",
    )
    p.add_argument("--seed", type=int, help="seed of the --random weights (default 0)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--page-size", type=int, default=16, choices=[8, 16, 32])
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="complete one prompt, streamed to the terminal")
    p.add_argument("prompt")
    _add_runtime_flags(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="HTTP server (KServe v2 + OpenAI), embedded model default")
    _add_runtime_flags(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY`")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["bench"], ["perf"]):  # the perf harness parses its own subcommands
        from spinserve.perf.cli_bench import bench_main, perf_main

        return (bench_main if argv[0] == "bench" else perf_main)(argv[1:])
    if argv[:1] == ["eval"]:  # accuracy harness (passkey, greedy agreement, perplexity)
        from spinserve.perf.eval_accuracy import main as eval_main

        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    from spinserve.control.engine import RequestError

    try:
        return args.func(args)
    except (EngineError, RequestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
    except ValidationError as e:
        lines = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        print("error: invalid settings: " + "; ".join(lines), file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
