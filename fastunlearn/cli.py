"""Command line: ``fastunlearn run | collect | eval | backends | configs``."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

from . import log
from .signals import Terminated, sigterm_as_interrupt

RUN_EPILOG = """\
Overrides are key=value pairs with dotted keys (train.lr=1e-5) or unique leaf names (lr=1e-5).
Options and their defaults:
{options}
"""


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input or environment problems: one line, exit 2.

    ValueError covers ConfigError, DataError, ModelError, OutputError, DistributedError,
    CheckpointError, UnicodeDecodeError and the argument errors of peft and transformers;
    OSError covers the filesystem (missing, read-only, full); FloatingPointError is a run that
    diverged or became non-finite.
    """
    from .losses._build import ExtensionBuildError
    from .losses.registry import BackendUnavailableError

    kinds = [ValueError, OSError, OverflowError, FloatingPointError, BackendUnavailableError,
             ExtensionBuildError]
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        kinds.append(torch.OutOfMemoryError)
    return tuple(kinds)


def _one_line(exc: BaseException) -> str:
    """The cause of ``exc`` in one line."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())
    return f"out of memory: {text}" if isinstance(exc, oom) else text


# Modules of the optional extras: a command that needs a missing one says which extra to install.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("transformers", "tokenizers", "yaml", "tqdm", "matplotlib", "safetensors",
                     "gguf", "numpy"), "train"),
    "peft": "lora", "triton": "triton", "pyarrow": "data", "datasets": "data",
    "tensorboard": "tensorboard",
}


def _missing_extra(exc: ImportError) -> str | None:
    """One line naming the extra that provides the missing module of ``exc``, if it is one."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (f"{top} is not installed; this needs the {extra} extra: "
            f"pip install 'fastunlearn[{extra}]'")


def _fail(msg: str) -> int:
    print(f"fastunlearn: error: {msg}", file=sys.stderr)
    return 2


def _default_out_dir(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.recipe.replace(':', '-')}-{stamp}"


def cmd_run(args) -> int:
    from . import checkpoint
    from . import distributed as dist
    from .config import load_config
    from .outputs import check_writable_location
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    # Launch problems before any work (and before waiting for other processes).
    dist.check_launcher_env()
    dist.check_rows_per_rank(cfg.train.batch_size, dist.env_world_size())
    if args.resume:
        checkpoint.check_resumable(args.resume, checkpoint.run_fingerprint(cfg))
    if args.quiet:
        log.configure("warning")  # no info lines either
        _quiet_libraries()
    if args.out:
        cfg.out = args.out
    if cfg.model.reference == "cached" and cfg.model.reference_cache_dir:
        check_writable_location(cfg.model.reference_cache_dir,
                                "reference cache folder (model.reference_cache_dir)")
    if dist.env_world_size() > 1:
        dist.init_from_env(cfg.train.device)
    try:
        with _claimed_output(cfg) as (out, work):
            summary = Trainer(cfg, out, progress=not args.quiet, resume=args.resume).run(work)
        main_process = dist.is_main()
    finally:
        dist.shutdown()
    if not main_process:  # rank 0 reports
        return 0
    after, before = summary.get("after", {}), summary.get("before", {})
    print(f"fastunlearn: {summary['steps']} steps in {summary['wall_seconds']:.0f} s "
          f"(backend {summary['backend']}, {summary['tokens_per_second']:.0f} tokens/s"
          + (f", {summary['processes']} processes" if summary.get("processes", 1) > 1 else "")
          + ")")
    for key in ("forget_nll", "normal_kl", "harmful_rate"):
        if key in before and key in after and before[key] is not None and after[key] is not None:
            print(f"  {key}: {before[key]:.4f} -> {after[key]:.4f}")
    print(f"  report: {out / 'summary.md'}")
    return 0


@contextlib.contextmanager
def _claimed_output(cfg):
    """``(out, work)``: the output folder and its hidden working folder, filled during the run
    and renamed to ``out`` only when the run finishes (outputs.atomic_dir). With several
    processes rank 0 alone claims and renames it and tells the others where it is."""
    from . import distributed as dist
    from .outputs import atomic_dir, free_name

    with contextlib.ExitStack() as stack:
        found = None
        if dist.is_main():
            out = Path(cfg.out) if cfg.out else free_name(_default_out_dir(cfg))
            try:
                found = (out, stack.enter_context(atomic_dir(out)))
            except ValueError as exc:
                if not dist.is_distributed():
                    raise
                dist.all_gather_objects((type(exc), str(exc)))
                raise
        if dist.is_distributed():
            shared = dist.all_gather_objects(found)[0]
            if not isinstance(shared[1], Path):  # rank 0 could not claim it
                raise shared[0](shared[1])
            found = shared
        yield found


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
    from . import __version__

    parser = OneLineParser(
        prog="fastunlearn",
        description="Unlearn harmful / copyrighted / hallucinated outputs from a causal LM "
                    "(Yao, Xu, Liu 2023) with fused loss kernels.")
    parser.add_argument("--version", action="version", version=f"fastunlearn {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error too (any position on the line)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="run an unlearning job",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=_run_epilog())
    run.add_argument("--config", default="default",
                     help="YAML file or bundled config name (default: default)")
    run.add_argument("--out", help="output directory (default: runs/<recipe>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--resume", metavar="DIR",
                     help="continue from a checkpoint (train.save_every) folder, or the newest "
                          "one under DIR; same config and model, any number of processes")
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


def _run_epilog() -> str:
    try:
        from .config import describe_options
    except ImportError as exc:  # without the train extra, the other commands still work
        return _missing_extra(exc) or str(exc)
    return RUN_EPILOG.format(options=describe_options())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    log.configure("info")
    try:
        with sigterm_as_interrupt():
            if argv and argv[0] in ("collect", "eval"):
                return _guard(lambda: _delegate(argv[0], argv[1:]), debug)
            parser = build_parser()
            return _guard(lambda: _dispatch(parser, argv), debug)
    finally:
        log.reset()  # an in-process call leaves the caller's logging as it was


def _delegate(command: str, argv: list[str]) -> int:
    """collect / eval own their argument parsing; imported inside the guard, so a missing
    extra is one line too."""
    if command == "collect":
        from .collect import collect_main
        return collect_main(argv)
    from .eval.cli import eval_main
    return eval_main(argv)


def _dispatch(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # Options and key=value overrides in any order (run a=1 --out o b=2): argparse stops
    # collecting the positional overrides at the first option, so gather the rest here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args.func(args)


def _guard(fn, debug: bool = False) -> int:
    """Run a command: expected failures become one line and exit 2 (the traceback too with
    --debug); anything else is a bug in fastunlearn and says so, with its traceback."""
    try:
        return int(fn() or 0)
    except Terminated:
        return _fail("terminated (SIGTERM); the unfinished output was removed")
    except KeyboardInterrupt:
        return _fail("interrupted; the unfinished output was removed")
    except _expected_errors() as exc:
        if debug:
            traceback.print_exc()
        return _fail(_one_line(exc))
    except Exception as exc:
        hint = _missing_extra(exc) if isinstance(exc, ImportError) else None
        if hint:  # an optional extra is not installed: the user's environment, not a bug
            if debug:
                traceback.print_exc()
            return _fail(hint)
        traceback.print_exc()
        print(f"fastunlearn: internal error (a bug in fastunlearn, please report it with the "
              f"traceback above): {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
