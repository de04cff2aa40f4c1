"""Command line: ``python -m cnnreg <command> ...`` (also installed as ``cnnreg``).

Commands: ``register`` (two images -> warped image, displacement field, Jacobian, summary,
QC picture) and ``apply`` (warp any image with an exported field), in :mod:`cnnreg.commands`;
further commands (``evaluate``, ``atlas``, ``train``, ``simulation-inputs``, ``batch``) live in
their own modules, each imported only when its command runs, so that ``--help`` and argument
errors never load torch.

Progress (``register``): in a terminal a bar and a summary; one JSON object per line on
standard output when it is piped or with ``--progress jsonl``, events ``start``, ``progress`` (stage, iteration, iterations, fraction 0..1,
loss, similarity_loss, regularization), ``done`` (with the summary) or ``error`` (message);
plus the bar on standard error whenever that is a terminal.

Exit codes: 0 success, 2 bad input, 3 device problem, 4 numerical failure, 130 cancelled.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .commands import add_apply_arguments, add_register_arguments, run_apply, run_command, run_register


def _evaluate():
    from . import evaluate_cli

    return evaluate_cli


def _atlas():
    from . import atlas

    return atlas


def _train():
    from .training import cli

    return cli


def _simulation():
    from . import simulation

    return simulation


def _batch():
    from . import batch

    return batch


#: further commands: name -> (the module exposing ``add_arguments(parser)`` and ``run(args) -> int``,
#: imported only when its command runs, since some import torch; the help line)
PLUGIN_COMMANDS = {
    "evaluate": (_evaluate, "score registration results against label maps (Dice, HD95, folding, TRE)"),
    "atlas": (_atlas, "build an unbiased average image and probabilistic label atlas from many subjects"),
    "train": (_train, "train a learned registration network from image files"),
    "simulation-inputs": (_simulation, "organ, activity and attenuation maps for a SPECT/PET simulator"),
    "batch": (_batch, "register a cohort of pairs on Dask (a local cluster, a scheduler, SLURM or PBS)"),
}


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default or
    there is none to name (None, False, a required option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or nothing or action.required:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and ``{command: run}``. With ``argv`` only the command named there is fully
    built (so ``--help`` and argument errors of the others never import torch); without it, all."""
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="cnnreg", description="Deformable image registration with CNNs (CPU/GPU, 2D/3D)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    runners = {}
    register_parser = commands.add_parser(
        "register",
        help="register a moving image to a fixed image",
        formatter_class=DefaultsHelpFormatter,
    )
    add_register_arguments(register_parser)
    runners["register"] = run_register
    apply_parser = commands.add_parser(
        "apply", help="warp an image with an exported displacement field", formatter_class=DefaultsHelpFormatter
    )
    add_apply_arguments(apply_parser)
    runners["apply"] = run_apply
    for name, (load, help_line) in PLUGIN_COMMANDS.items():
        sub = commands.add_parser(name, help=help_line)
        if argv is not None and name != chosen:
            continue  # listed in the help; built only when it is the command
        module = load()
        module.add_arguments(sub)
        sub.formatter_class = DefaultsHelpFormatter  # every default shown (descriptions kept as written)
        runners[name] = module.run
    return parser, runners


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, handle_signals: bool = False) -> int:
    """Run one command; returns the exit code.  ``handle_signals`` (programs only, main
    thread) turns SIGTERM and SIGHUP into a clean cancel, as Ctrl-C is."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, runners = build_parser(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for the results' provenance
    if handle_signals:  # a closed terminal (SIGHUP) cancels cleanly too, as SIGTERM and Ctrl-C do
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _raise_keyboard_interrupt)
    return run_command(runners[args.command], args)


def console_main() -> int:
    """Entry point of the ``cnnreg`` program and of ``python -m cnnreg``."""
    return main(handle_signals=True)


if __name__ == "__main__":
    sys.exit(console_main())
