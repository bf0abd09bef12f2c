"""The `spinserve bench ...` and `spinserve perf ...` command lines (control/cli.py hands over):

    spinserve bench serve  [flags]    load a running OpenAI endpoint      (perf/bench_serve.py)
    spinserve bench engine [flags]    the same workloads offline          (perf/bench_engine.py)
    spinserve bench plot FILES...     one figure comparing saved runs     (perf/bench_plots.py)
    spinserve bench headline FILES... dense vs spin table, JSON and plot  (perf/bench_plots.py)
    spinserve perf check   [flags]    results vs perf/baselines; CI gate  (perf/check.py)

Exit status: 0 success; 1 a request failed (bench) or a regression (perf check); 2 bad input
(`error: ...` on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def bench_parser() -> argparse.ArgumentParser:
    from . import bench_engine, bench_plots, bench_serve

    p = argparse.ArgumentParser(prog="spinserve bench", description="serving benchmarks")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser(
        "serve",
        help="load a running OpenAI-compatible endpoint (streaming)",
        description=bench_serve.__doc__.splitlines()[0],
    )
    bench_serve.add_args(s)
    s.set_defaults(func=bench_serve.run)
    e = sub.add_parser(
        "engine",
        help="the same workloads offline through LLMEngine",
        description=bench_engine.__doc__.splitlines()[0],
    )
    bench_engine.add_args(e)
    e.set_defaults(func=bench_engine.run)
    g = sub.add_parser("plot", help="throughput and latency-CDF plots comparing saved results")
    bench_plots.add_plot_args(g)
    g.set_defaults(func=bench_plots.run_plot)
    h = sub.add_parser(
        "headline",
        help="table + plot of <part>-dense vs <part>-spin `bench engine` runs (ratios)",
    )
    bench_plots.add_headline_args(h)
    h.set_defaults(func=bench_plots.run_headline)
    return p


def perf_parser() -> argparse.ArgumentParser:
    from . import check

    p = argparse.ArgumentParser(prog="spinserve perf", description="performance regression tools")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser(
        "check",
        help="compare results with perf/baselines (CI gate: --run)",
        description=check.__doc__.splitlines()[0],
    )
    check.add_args(c)
    c.set_defaults(func=check.run)
    return p


def bench_main(argv: list[str] | None = None) -> int:
    """`spinserve bench ARGS...`: argv without the leading "bench"."""
    return _dispatch(bench_parser(), argv)


def perf_main(argv: list[str] | None = None) -> int:
    """`spinserve perf ARGS...`: argv without the leading "perf"."""
    return _dispatch(perf_parser(), argv)
