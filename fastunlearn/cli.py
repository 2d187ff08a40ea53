"""Command line: ``fastunlearn run | collect | eval | backends | configs``."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

RUN_EPILOG = """\
Overrides are key=value pairs with dotted keys (train.lr=1e-5) or unique leaf names (lr=1e-5).
Options and their defaults:
{options}
"""


def _errors():
    """Exception types that are the user's input problems: one line, exit 2."""
    from .config import ConfigError
    from .losses.registry import BackendUnavailableError
    from .models import ModelError

    kinds = [ConfigError, ModelError, BackendUnavailableError, FileNotFoundError]
    try:
        from .data import DataError
        kinds.append(DataError)
    except ImportError:
        pass
    return tuple(kinds)


def _fail(msg: str) -> int:
    print(f"fastunlearn: error: {msg}", file=sys.stderr)
    return 2


def _default_out_dir(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.recipe.replace(':', '-')}-{stamp}"


def cmd_run(args) -> int:
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.quiet:
        _quiet_libraries()
    if args.out:
        cfg.out = args.out
    out = Path(cfg.out) if cfg.out else _default_out_dir(cfg)
    if out.exists() and any(out.iterdir()):
        return _fail(f"output directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Work in a hidden sibling folder; only a finished run is renamed to the final name.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        summary = Trainer(cfg, out, progress=not args.quiet).run(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(work, out)
    after, before = summary.get("after", {}), summary.get("before", {})
    print(f"fastunlearn: {summary['steps']} steps in {summary['wall_seconds']:.0f} s "
          f"(backend {summary['backend']}, {summary['tokens_per_second']:.0f} tokens/s)")
    for key in ("forget_nll", "normal_kl", "harmful_rate"):
        if key in before and key in after and before[key] is not None and after[key] is not None:
            print(f"  {key}: {before[key]:.4f} -> {after[key]:.4f}")
    print(f"  report: {out / 'summary.md'}")
    return 0


def _quiet_libraries() -> None:
    """No progress bars or info logs from transformers (model loading) under --quiet."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_backends(args) -> int:
    from .losses import describe_backends

    rows = describe_backends()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        status = "available" if r["available"] else "unavailable"
        devices = "/".join(r["devices"]) or "-"
        print(f"{r['name']:<10} {status:<12} {devices:<9} {r['reason']}")
    return 0


def cmd_configs(args) -> int:
    from .config import bundled_config_names, read_yaml

    if args.name:
        data, _ = read_yaml(args.name)
        import yaml
        print(yaml.safe_dump(data, sort_keys=False))
        return 0
    for name in bundled_config_names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import describe_options

    parser = argparse.ArgumentParser(
        prog="fastunlearn",
        description="Unlearn harmful / copyrighted / hallucinated outputs from a causal LM "
                    "(Yao, Xu, Liu 2023) with fused loss kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an unlearning job",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=RUN_EPILOG.format(options=describe_options()))
    run.add_argument("--config", default="default",
                     help="YAML file or bundled config name (default: default)")
    run.add_argument("--out", help="output directory (default: runs/<recipe>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.set_defaults(func=cmd_run)

    col = sub.add_parser("collect", help="write a forget set from the model's own answers",
                         add_help=False)
    col.set_defaults(func=None, delegate="collect")
    ev = sub.add_parser("eval", help="evaluate a model (harmful rate, utility, report)",
                        add_help=False)
    ev.set_defaults(func=None, delegate="eval")

    be = sub.add_parser("backends", help="list loss backends and whether they run here")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_backends)

    cf = sub.add_parser("configs", help="list bundled configs, or print one")
    cf.add_argument("name", nargs="?")
    cf.set_defaults(func=cmd_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # collect / eval own their argument parsing.
    if argv and argv[0] == "collect":
        from .collect import collect_main
        return _guard(lambda: collect_main(argv[1:]))
    if argv and argv[0] == "eval":
        from .eval.cli import eval_main
        return _guard(lambda: eval_main(argv[1:]))
    args = build_parser().parse_args(argv)
    return _guard(lambda: args.func(args))


def _guard(fn) -> int:
    try:
        return int(fn() or 0)
    except _errors() as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
