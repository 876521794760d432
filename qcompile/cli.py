"""The `qcompile` command line: the composition root.

This is the one core module that brings the pass catalogue (qcompile.passes) and, later,
the backend together with the IR. Every user error becomes one line on stderr and exit
code 2; a traceback appears only with --debug. Outputs are written atomically.

    qcompile MODEL [--passes PIPELINE] [-o OUT.onnx]     run a pipeline, write ONNX
    qcompile inspect MODEL [--format json] [--dot F]     summarise a model
    qcompile passes                                      list passes and options
    qcompile targets [NAME_OR_PATH]                      list targets, or show one
    qcompile MODEL --target T --calib D [-o OUT.rsim]    compile for an accelerator and simulate
    qcompile run PROGRAM.rsim --input X.npz [-o Y.npz]   simulate a program over samples
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
import warnings
from typing import List, Optional, Sequence

from . import __version__
from ._fileio import atomic_write
from .errors import QCompileError
from .ir import verify
from .onnx_io import load, save

__all__ = ["main"]

COMMANDS = ("compile", "inspect", "passes", "targets", "run")
_OPTIONS_WITH_VALUE = {"--plugin", "--passes", "-o", "--output", "--calib", "--print-ir-after", "--format", "--dot",
                       "--target", "--dump", "--report-json", "--samples", "--input", "--batch"}
TARGET_PIPELINE = "fold,calibrate,quantize,lower-integer"
_RANDOM_CALIB_SAMPLES = 32

DESCRIPTION = """\
qcompile: a quantization compiler for edge AI.

commands:
  qcompile MODEL.onnx [--passes PIPELINE] [-o OUT.onnx]   run a pass pipeline (default command)
  qcompile inspect MODEL.onnx [--format json] [--dot F]   summary, MACs, per-node table
  qcompile passes                                         list passes and their options
  qcompile targets [NAME | FILE.toml]                     list accelerator targets, or show one
  qcompile MODEL.onnx --target rain-sim --calib D.npz -o M.rsim
                                                          quantize, lower, compile and simulate
  qcompile run M.rsim --input X.npz [-o Y.npz]            simulate a program over a file of samples

A pipeline is text: `canonicalize,dce` or `upgrade-opset{version=13},canonicalize`.
Run `qcompile COMMAND --help` for a command's options."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            if not debug:       # one line each, as errors are; --debug keeps Python's form (file, line)
                warnings.showwarning = _show_warning
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"qcompile: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


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
            "targets": _cmd_targets, "run": _cmd_run}[command](args)


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
                      help="calibration data for the pipeline's calibrate, prune and sparsify passes (an .npz file or "
                           "a folder of them)")
    comp.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                      help="print the IR to stderr after the named pass (repeatable)")
    comp.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    comp.add_argument("--timing", action="store_true", help="report time spent in each pass")
    comp.add_argument("--stats", action="store_true", help="report per-pass statistics")
    comp.add_argument("--no-verify", action="store_true", help="skip the verifier after each pass")
    comp.add_argument("--target", metavar="NAME_OR_PATH",
                      help="compile for an accelerator target (a preset such as rain-sim, or FILE.toml) and simulate; "
                           f"the pipeline defaults to {TARGET_PIPELINE} and -o writes the .rsim program")
    comp.add_argument("--dump", action="append", default=[], metavar="STAGE",
                      help="with --target: print a lowering stage to stderr: partition, schedule, allocation, "
                           "instructions, binary or all (repeatable)")
    comp.add_argument("--report-json", metavar="FILE.json", help="with --target: also write the report as JSON")
    comp.add_argument("--samples", type=int, default=16, metavar="N",
                      help="with --target: calibration samples to simulate for the error against the float model")
    comp.add_argument("--random-calib", action="store_true",
                      help="with --target and no --calib: calibrate on random inputs (the accuracy is meaningless)")

    insp = sub.add_parser("inspect", parents=[common], help="summarise a model",
                          description="Op histogram, parameters, MACs, shapes and a per-node table.")
    insp.add_argument("model", metavar="MODEL.onnx|PROGRAM.rsim")
    insp.add_argument("--format", choices=("text", "json"), default="text")
    insp.add_argument("--dot", metavar="FILE.dot", help="also write the graph as Graphviz DOT")

    sub.add_parser("passes", parents=[common], help="list the available passes and their options")

    run = sub.add_parser("run", parents=[common], help="simulate a .rsim program over a file of samples",
                         description="Run every sample of X.npz (input names as keys, N samples along an extra "
                                     "leading axis) through the program on rain-sim; print the per-layer report "
                                     "and write the outputs, dequantized to float, in the same convention.")
    run.add_argument("program", metavar="PROGRAM.rsim")
    run.add_argument("--input", required=True, metavar="X.npz", help="samples to run")
    run.add_argument("-o", "--output", metavar="Y.npz", help="write the outputs here")
    run.add_argument("--target", metavar="NAME_OR_PATH", help="the target (default: the preset the program names)")
    run.add_argument("--report-json", metavar="FILE.json", help="also write the report as JSON")
    run.add_argument("--batch", type=int, default=64, metavar="N", help="samples simulated together (memory)")

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
    target = None
    if args.target:
        target = _prepare_target(args, model)
    elif args.dump or args.report_json or args.random_calib:
        flag = "--dump" if args.dump else "--report-json" if args.report_json else "--random-calib"
        raise QCompileError(f"{flag} needs --target (it belongs to compiling for an accelerator)")
    float_proto = _float_model_bytes(model) if target is not None else None
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
    elif target is not None and any(p.name == "calibrate" for p in manager.passes):
        _random_calibration(args, model)
    result = manager.run(model)
    if timing is not None:
        print(timing.report(), file=sys.stderr)
    if stats is not None:
        print(stats.report(), file=sys.stderr)
    _print_pass_findings(result.model)
    if target is not None:
        return _compile_for_target(args, result.model, target, float_proto, model)
    if args.output:
        save(result.model, args.output)
        print(f"wrote {args.output} ({len(result.model.graph)} nodes"
              f"{', pipeline ' + str(manager) if manager.passes else ', round trip'})")
    else:
        print(result.model)
    return 0


def _print_pass_findings(model) -> None:
    """What the passes found that a user must see, on stderr (stdout may carry the model):
    layers `quantize` kept at higher precision, and why; the `error-report` table."""
    for d in model.annotations.get("quantization_decisions") or ():
        print(f"qcompile: quantize: {d['op']} '{d['node']}': {d['reason']}", file=sys.stderr)
    report = model.annotations.get("error_report")
    if report is not None:
        table = report.format_table()
        print(table, file=sys.stderr, end="" if table.endswith("\n") else "\n")


def _prepare_target(args, model):
    """Check --target and --dump before the long work; choose the default pipeline."""
    from .backend.lowering import STAGES
    from .backend.target import load_target

    target = load_target(args.target)
    for stage in args.dump:
        if stage != "all" and stage not in STAGES:
            raise QCompileError(f"--dump {stage}: no such stage (stages: {', '.join(STAGES)}, or all)")
    if args.samples < 1:
        raise QCompileError(f"--samples {args.samples}: give at least 1")
    if args.report_json:
        _check_output_path(args.report_json)
    if not args.passes and "qcompile.int" not in model.opset_imports:
        args.passes = TARGET_PIPELINE
    return target


def _float_model_bytes(model) -> bytes:
    from .onnx_io.exporter import to_proto

    return to_proto(model).SerializeToString()


def _random_calibration(args, model) -> None:
    """No --calib: refuse, unless --random-calib asks for random inputs (with a warning)."""
    if not args.random_calib:
        raise QCompileError(
            f"{args.model}: compiling for --target {args.target} quantizes the model and needs calibration data: "
            "give --calib DATA.npz (keys = the model's input names, each an array of N samples of the input's "
            "shape, e.g. examples/digits_calib.npz), or --random-calib to calibrate on random inputs (the "
            "accuracy is then meaningless)")
    import numpy as np

    from .data import model_inputs

    rng = np.random.default_rng(0)
    feeds = []
    specs = model_inputs(model)
    for _ in range(_RANDOM_CALIB_SAMPLES):
        feed = {}
        for spec in specs:
            shape = [d if isinstance(d, int) else 1 for d in (spec.shape or ())]
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        feeds.append(feed)
    model.annotations["calibration_data"] = feeds
    print(f"qcompile: warning: calibrating on {_RANDOM_CALIB_SAMPLES} random samples (--random-calib): "
          "quantization ranges and the reported error do not reflect real data", file=sys.stderr)


def _compile_for_target(args, int_model, target, float_proto: bytes, float_model) -> int:
    from .backend.driver import compare_with_float
    from .backend.lowering import STAGES, compile_program
    from .backend.program import save_program
    from .backend.simulator import format_report, simulate

    stages = set(STAGES) if "all" in args.dump else set(args.dump)

    def dump(stage: str, text: str) -> None:
        if stage in stages:
            print(f"// stage {stage}", file=sys.stderr)
            print(text, file=sys.stderr, end="" if text.endswith("\n") else "\n")

    if "qcompile.int" not in int_model.opset_imports:
        raise QCompileError(f"--target {args.target}: the pipeline '{args.passes}' does not produce an integer "
                            "graph; end it with lower-integer (the default pipeline is " + TARGET_PIPELINE + ")")
    program = compile_program(int_model, target, dump=dump)
    samples = _simulation_samples(args, float_model, program)
    result = simulate(program, target, samples)
    report = result.report
    report["error_vs_float"] = compare_with_float(float_proto, program, result.outputs, samples)
    print(format_report(report), end="")
    for name, e in report["error_vs_float"].items():
        print(f"error vs float on {e['samples']} samples, output {name}: SQNR {e['sqnr_db']:.2f} dB, cosine "
              f"{e['cosine']:.5f}, top-1 agreement {100 * e['top1_agreement']:.1f}%")
    # outputs only once everything has run: a failed simulation leaves no program behind
    if args.output:
        save_program(program, args.output)
    if args.report_json:
        atomic_write(args.report_json, json.dumps(report, indent=2, default=float), mode="w")
    if args.output:
        print(f"wrote {args.output} ({len(program.instructions)} instructions, {len(program.const)} B of constants, "
              f"target {target.name})")
    return 0


def _simulation_samples(args, float_model, program):
    """Up to --samples samples of the calibration data (or the random ones)."""
    from .backend.driver import stack_samples
    from .data import load_samples

    names = [s["name"] for s in program.inputs]
    if args.calib:
        samples = [feed for _, _, feed in load_samples(args.calib, float_model).samples(limit=args.samples)]
    else:
        samples = list(float_model.annotations.get("calibration_data", []))[:args.samples]
    return stack_samples(samples, names)


def _give_calibration_data(manager, path: str) -> None:
    """Point the pipeline's passes that read data (calibrate, and prune's sensitivity
    analysis or sparsify's activation thresholds) and name none of their own at `path`."""
    if not os.path.exists(path):
        raise QCompileError(f"--calib {path}: no such file or folder")
    readers = [p for p in manager.passes if p.name in ("calibrate", "prune", "sparsify")]
    if not readers:
        raise QCompileError(f"--calib {path}: the pipeline '{manager}' has no pass that reads data "
                            "(calibrate, prune, sparsify)")
    for p in readers:
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

    if _is_program(args.model):
        from .backend.driver import describe_program

        if args.dot or args.format == "json":
            raise QCompileError(f"{args.model}: --dot and --format json apply to ONNX models, not programs")
        print(describe_program(args.model), end="")
        return 0
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


def _is_program(path: str) -> bool:
    if path.endswith(".rsim"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"RSIM"
    except OSError:
        return False


def _cmd_run(args) -> int:
    from .backend.driver import run_program_file
    from .backend.simulator import format_report

    if args.batch < 1:
        raise QCompileError(f"--batch {args.batch}: give at least 1")
    _check_output_path(args.output)
    if args.report_json:
        _check_output_path(args.report_json)
    report, summary = run_program_file(args.program, args.input, args.target, args.output, args.batch)
    print(format_report(report), end="")
    line = f"simulated {summary['samples']} samples"
    if "accuracy" in summary:
        line += f"; top-1 accuracy against the file's labels {100 * summary['accuracy']:.2f}%"
    print(line)
    if args.report_json:
        report["summary"] = summary
        atomic_write(args.report_json, json.dumps(report, indent=2, default=float), mode="w")
    if args.output:
        print(f"wrote {args.output}")
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
