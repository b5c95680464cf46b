"""``python -m uckpt`` / ``uckpt``: convert, plan, export, inspect, verify.

    torchrun --nproc_per_node 4 -m uckpt convert --input_folder ckpts/global_step1000 \
        --output_folder ckpts/global_step1000_universal
"""
import argparse
import json
import sys
from typing import List, Optional

from .. import __version__
from .. import options
from ..errors import UckptError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="uckpt", description="Distributed DeepSpeed ZeRO -> Universal checkpoint converter")
    ap.add_argument("--version", action="version", version=f"uckpt {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("convert", "convert a ZeRO checkpoint folder into a Universal checkpoint"),
                        ("plan", "print the conversion plan (who reads, owns and sends what) and exit")):
        p = sub.add_parser(name, help=help_, argument_default=argparse.SUPPRESS)
        for key, flag, kw in options.flags():
            p.add_argument(f"--{flag}", *kw.pop("aliases", []), dest=key, **kw)
        if name == "plan":  # plus --simulate and its layout options (the budget and log flags are shared)
            shared = set(options.valid_keys())
            for key, flag, kw in options.flags(options.SimulateConfig):
                if key not in shared:
                    p.add_argument(f"--{flag}", *kw.pop("aliases", []), dest=key, **kw)
        p.add_argument("--config", metavar="YAML", help="omegaconf YAML with the same keys")
        p.add_argument("--print-config", dest="print_config", action="store_true", help="print the resolved config")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. io.threads=8 memory.budget_mb=2048")
    p = sub.add_parser("export", help="write Hugging Face safetensors from a Universal or native checkpoint",
                       argument_default=argparse.SUPPRESS)
    for key, flag, kw in options.flags(options.ExportConfig):
        p.add_argument(f"--{flag}", *kw.pop("aliases", []), dest=key, **kw)
    p.add_argument("--config", metavar="YAML", help="omegaconf YAML with the same keys (uckpt.options.ExportConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. memory.budget_mb=2048")
    p = sub.add_parser("inspect", help="describe a DeepSpeed or Universal checkpoint and whether it converts")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("verify", help="check a Universal checkpoint (and, with --against, re-slice it to the source)",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("universal", nargs="?")
    p.add_argument("--against", metavar="NATIVE", help="the DeepSpeed checkpoint tag folder it was converted from")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--config", metavar="YAML", help="omegaconf YAML with the same keys (uckpt.options.VerifyConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. against=ckpts/global_step10")
    return ap


def _inspect_or_verify(command: str, args) -> int:
    if command == "inspect":
        from .inspect import format_table, inspect_path

        info = inspect_path(args["path"])
        print(json.dumps(info, indent=2, default=str) if args["json"] else format_table(info))
        return 0
    from .verify import format_report, verify

    overrides = list(args.pop("overrides", []))
    if "=" in args.get("universal", ""):  # argparse hands the first override to the optional positional
        overrides.insert(0, args.pop("universal"))
    cfg = options.build(args.pop("config", None), overrides, values=args, schema=options.VerifyConfig)
    report = verify(cfg.universal, cfg.against)
    print(json.dumps(report, indent=2, default=str) if cfg.json else format_report(report))
    return 0 if report["ok"] else 1


def _exit_code(command) -> int:
    """Run ``command()``: its exit code (0 for None), or 2 with the one-line error of a UckptError."""
    try:
        code = command()
    except UckptError as exc:
        print(f"uckpt: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return code or 0


def _simulate(args):
    from .simulate import simulate

    known = set(options.valid_keys(options.SimulateConfig))
    other = sorted(k for k in args if k not in known | {"config", "overrides", "print_config"})
    if other:
        raise UckptError(f"--simulate plans a synthetic layout; it takes no {', '.join(other)}",
                         fix="leave out the options of a real conversion")
    simulate(options.build(args.pop("config", None), args.pop("overrides", []),
                           options.nest({k: v for k, v in args.items() if k in known}), schema=options.SimulateConfig))


def _export(args):
    from ..api import export_with_config

    export_with_config(options.build(args.pop("config", None), args.pop("overrides", []), options.nest(args),
                                     schema=options.ExportConfig))


def main(argv: Optional[List[str]] = None) -> int:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    if command in ("inspect", "verify"):
        return _exit_code(lambda: _inspect_or_verify(command, args))
    if command == "export":
        return _exit_code(lambda: _export(args))
    if command == "plan" and "simulate" in args:
        return _exit_code(lambda: _simulate(args))
    return _exit_code(lambda: _convert(command, args))


def _convert(command: str, args):
    """``convert``, or ``plan`` (a dry run that prints the plan)."""
    from ..api import run_with_config

    yaml_path = args.pop("config", None)
    print_config = args.pop("print_config", False)
    overrides = args.pop("overrides", [])
    values = options.nest(args)  # argparse's dest is each option's dotted key
    if command == "plan":
        values["dry_run"] = True
    cfg = options.build(yaml_path, overrides, values)
    if print_config:
        print(options.to_yaml(cfg), end="")
    report = run_with_config(cfg)
    if report is not None and cfg.log.json and report.get("dry_run"):
        with open(cfg.log.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
