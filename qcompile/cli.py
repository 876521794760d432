"""The `qcompile` command line: the composition root.

This is the one core module that brings the pass catalogue (qcompile.passes) and, later,
the backend together with the IR. Every user error becomes one line on stderr and exit
code 2; a traceback appears only with --debug. Outputs are written atomically.

    qcompile MODEL [--passes PIPELINE] [-o OUT.onnx]     run a pipeline, write ONNX
    qcompile inspect MODEL [--format json] [--dot F]     summarise a model
    qcompile passes                                      list passes and options
    qcompile targets [NAME_OR_PATH]                      list targets, or show one
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from typing import List, Optional, Sequence

from . import __version__
from ._fileio import atomic_write
from .errors import QCompileError
from .ir import verify
from .onnx_io import load, save

__all__ = ["main"]

COMMANDS = ("compile", "inspect", "passes", "targets")
_OPTIONS_WITH_VALUE = {"--plugin", "--passes", "-o", "--output", "--calib", "--print-ir-after", "--format", "--dot"}

DESCRIPTION = """\
qcompile: a quantization compiler for edge AI.

commands:
  qcompile MODEL.onnx [--passes PIPELINE] [-o OUT.onnx]   run a pass pipeline (default command)
  qcompile inspect MODEL.onnx [--format json] [--dot F]   summary, MACs, per-node table
  qcompile passes                                         list passes and their options
  qcompile targets [NAME | FILE.toml]                     list accelerator targets, or show one

A pipeline is text: `canonicalize,dce` or `upgrade-opset{version=13},canonicalize`.
Run `qcompile COMMAND --help` for a command's options."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _dispatch(argv)
    except QCompileError as e:
        if debug:
            traceback.print_exc()
        print(f"qcompile: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else is our bug, not the user's
        if debug:
            traceback.print_exc()
        else:
            print(
                f"qcompile: internal error: {type(e).__name__}: {_one_line(e)} "
                "(this is a bug in qcompile; rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _dispatch(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    if argv[0] == "--version":
        print(f"qcompile {__version__}")
        return 0
    command = _command_of(argv)
    if command is None:
        argv = ["compile"] + argv
        command = "compile"
    else:
        argv.remove(command)
        argv = [command] + argv
    args = _top_parser().parse_args(argv)
    for path in args.plugin:
        _load_plugin(path)
    return {"compile": _cmd_compile, "inspect": _cmd_inspect, "passes": _cmd_passes,
            "targets": _cmd_targets}[command](args)


def _command_of(argv: List[str]) -> Optional[str]:
    """The subcommand named in argv, or None for the default (compile) command. The
    first positional token decides; values of options are skipped."""
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token.startswith("-"):
            skip = token in _OPTIONS_WITH_VALUE
            continue
        return token if token in COMMANDS else None
    return None


def _top_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="load a Python file that registers passes (repeatable)")
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    top = argparse.ArgumentParser(prog="qcompile", description=DESCRIPTION,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    comp = sub.add_parser("compile", parents=[common], help="run a pass pipeline on a model (default)",
                          description="Import MODEL, run the pass pipeline, write ONNX.")
    comp.add_argument("model", metavar="MODEL.onnx")
    comp.add_argument("--passes", default="", metavar="PIPELINE",
                      help="pass pipeline, e.g. 'canonicalize,dce' (default: none, a plain round trip)")
    comp.add_argument("-o", "--output", metavar="OUT.onnx", help="write the resulting model here")
    comp.add_argument("--calib", metavar="DATA.npz",
                      help="calibration data for the pipeline's 'calibrate' pass (an .npz file or a folder of them)")
    comp.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                      help="print the IR to stderr after the named pass (repeatable)")
    comp.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    comp.add_argument("--timing", action="store_true", help="report time spent in each pass")
    comp.add_argument("--stats", action="store_true", help="report per-pass statistics")
    comp.add_argument("--no-verify", action="store_true", help="skip the verifier after each pass")

    insp = sub.add_parser("inspect", parents=[common], help="summarise a model",
                          description="Op histogram, parameters, MACs, shapes and a per-node table.")
    insp.add_argument("model", metavar="MODEL.onnx")
    insp.add_argument("--format", choices=("text", "json"), default="text")
    insp.add_argument("--dot", metavar="FILE.dot", help="also write the graph as Graphviz DOT")

    sub.add_parser("passes", parents=[common], help="list the available passes and their options")

    targ = sub.add_parser("targets", parents=[common], help="list the accelerator targets, or show one",
                          description="Without an argument, list the built-in target presets; with a preset "
                                      "name or a path to a target .toml file, print its parameters and the "
                                      "source of each energy figure.")
    targ.add_argument("target", nargs="?", metavar="NAME_OR_PATH", help="a preset name (e.g. rain-sim) or FILE.toml")
    return top


def _load_plugin(path: str) -> None:
    """Import a user's Python file so the passes it registers become available."""
    if not os.path.isfile(path):
        raise QCompileError(f"--plugin {path}: no such file")
    name = "qcompile_plugin_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise QCompileError(f"--plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except QCompileError:
        raise
    except Exception as e:
        raise QCompileError(f"--plugin {path}: failed to load: {type(e).__name__}: {e}") from e


def _load_verified(path: str):
    model = load(path)
    problems = verify(model)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise QCompileError(f"{path}: invalid graph: {problems[0]}{more}")
    return model


def _cmd_compile(args) -> int:
    from . import passmanager as pm_lib
    from . import passes as _builtin  # noqa: F401  (registers the built-in passes)

    model = _load_verified(args.model)
    _check_output_path(args.output)
    instruments = []
    timing = stats = None
    if args.print_ir_after or args.print_ir_after_all:
        instruments.append(pm_lib.PrintIRInstrument(after=set(args.print_ir_after), all=args.print_ir_after_all,
                                                     stream=sys.stderr))
    if args.timing:
        timing = pm_lib.TimingInstrument()
        instruments.append(timing)
    if args.stats:
        stats = pm_lib.StatisticsInstrument()
        instruments.append(stats)
    manager = pm_lib.PassManager.parse(args.passes, verify=not args.no_verify, instruments=instruments)
    if args.print_ir_after:
        known = {p.name for p in manager.passes}
        unknown = [n for n in args.print_ir_after if n not in known]
        if unknown:
            raise QCompileError(
                f"--print-ir-after {unknown[0]}: no such pass in the pipeline (it has: {', '.join(sorted(known)) or 'none'})"
            )
    if args.calib:
        _give_calibration_data(manager, args.calib)
    result = manager.run(model)
    if timing is not None:
        print(timing.report(), file=sys.stderr)
    if stats is not None:
        print(stats.report(), file=sys.stderr)
    if args.output:
        save(result.model, args.output)
        print(f"wrote {args.output} ({len(result.model.graph)} nodes"
              f"{', pipeline ' + str(manager) if manager.passes else ', round trip'})")
    else:
        print(result.model)
    return 0


def _give_calibration_data(manager, path: str) -> None:
    """Point the pipeline's calibrate passes that name no data of their own at `path`."""
    if not os.path.exists(path):
        raise QCompileError(f"--calib {path}: no such file or folder")
    calibrators = [p for p in manager.passes if p.name == "calibrate"]
    if not calibrators:
        raise QCompileError(f"--calib {path}: the pipeline '{manager}' has no 'calibrate' pass to use it")
    for p in calibrators:
        if "data" not in p.given_options:
            p.data = path


def _check_output_path(path: Optional[str]) -> None:
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise QCompileError(f"-o {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise QCompileError(f"-o {path}: is a directory; give a file name")


def _cmd_inspect(args) -> int:
    from .analysis import format_summary, infer_shapes, summarize, to_dot

    model = _load_verified(args.model)
    infer_shapes(model)
    summary = summarize(model)
    if args.dot:
        _check_output_path(args.dot)
        atomic_write(args.dot, to_dot(model.graph), mode="w")
    if args.format == "json":
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary))
    return 0


def _cmd_passes(args) -> int:
    from . import passmanager as pm_lib
    from . import passes as _builtin  # noqa: F401  (registers the built-in passes)

    for name, cls in sorted(pm_lib.available_passes().items()):
        print(f"{name:<18} {cls.summary()}")
        for opt in cls.options():
            print(f"    {opt}")
    return 0


def _cmd_targets(args) -> int:
    from .backend.target import format_target, format_target_list, load_target

    if args.target is None:
        print(format_target_list())
    else:
        print(format_target(load_target(args.target)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
