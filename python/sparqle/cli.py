"""``sparqle info``, ``sparqle bench`` and ``sparqle gpu-check``."""
import argparse
import importlib
import json
import os
import sys
from typing import List, Optional

from sparqle.registry import BENCHMARKS

# Benchmarks of whole models, of the host path and of the compression criteria' accuracy:
# each module's report(quick, progress) measures its own way (not per-op cases); run only
# when asked for with --op. A module's missing(), if it has one, says why it cannot run here.
REPORTS = ("e2e", "overhead", "accuracy")


def _bench(args) -> int:
    from sparqle.bench import harness
    if args.compare:
        before, after = (json.load(open(path)) for path in args.compare)
        print(harness.compare(before, after))
        return 0
    for op in args.op or BENCHMARKS:
        module = importlib.import_module(f"sparqle.bench.bench_{op}")
        reason = getattr(module, "missing", lambda: None)()
        if reason:
            print(f"skipped {op}: {reason}")
            continue
        name = op + ("-quick" if args.quick else "")
        if op in REPORTS:
            report = module.report(args.quick, progress=not args.no_progress)
            print(harness.cells_table(report, module.cells(report)))
            path = harness.write(report, args.out, name)
            with open(os.path.splitext(path)[0] + ".md", "w") as f:
                f.write(harness.cells_markdown(report, module.cells(report), op))
        else:
            report = harness.run(module.cases(args.quick), progress=not args.no_progress)
            print(harness.table(report, module.KEYS))
            path = harness.write(report, args.out, name, module.KEYS)
        print(f"wrote {path}")
        if args.plot:
            png = os.path.splitext(path)[0] + ".png"
            module.plot(report, png)
            print(f"wrote {png}")
    return 0


def _version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("sparqle")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparqle", description="sparqle: GPU kernels for sparse and low-bit linear algebra. "
                                    "Commands: info, bench, gpu-check.")
    parser.add_argument("--version", action="version", version=f"sparqle {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends can run")
    bench = sub.add_parser("bench", help="time sparqle's ops against the baselines")
    bench.add_argument("--quick", action="store_true", help="a small set (under a minute on a CPU)")
    bench.add_argument("--op", action="append", choices=BENCHMARKS + REPORTS,
                       help="only this op (repeatable); e2e (whole models), overhead (the host "
                            "path per call) and accuracy (all-MiniLM-L6-v2 with each compression "
                            "criterion) run only when named")
    bench.add_argument("--out", default="bench-results",
                       help="folder of the JSON and Markdown results (default bench-results; the "
                            "repository's results are committed from --out bench/results on purpose)")
    bench.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                       help="print the time ratio of the rows two result files share, and exit")
    bench.add_argument("--plot", action="store_true", help="also draw speed-up against sparsity")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    from sparqle.bench import gpu_check
    gpu_check.add_arguments(sub.add_parser(
        "gpu-check", help="the tests on the CUDA backends and the headline benchmark points, "
                          "in about 8 minutes (scripts/gpu_check.sh)"))
    args = parser.parse_args(argv)
    if args.command == "gpu-check":
        return gpu_check.run(args)
    if args.command == "info":
        import sparqle
        sparqle.info()
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
