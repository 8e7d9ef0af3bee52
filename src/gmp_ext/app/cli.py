"""The ``gmp-ext`` command: ``info``, ``plot RECIPE.yaml`` and, when installed, ``demo``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gmp_ext._version import __version__
from gmp_ext.training.recipes import Recipe, load_recipe
from gmp_ext.training.schedule import GMPSchedule

__all__ = ["main"]

PROG = "gmp-ext"

Handler = Callable[[argparse.Namespace], int]
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Handler]

# Optional commands living in their own module ``gmp_ext.<name>`` that exposes
# ``add_arguments(parser)`` and ``run(args) -> int``; each is listed only if its module exists.
_PLUGINS = ("demo",)
_TABLE_COLUMNS = 5
_MAX_TABLE_POINTS = 60  # beyond that only the first and last 30 are listed


def _info(args: argparse.Namespace) -> int:
    from gmp_ext.app.info import print_info

    print_info()
    return 0


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
        return value

    return parse


def _add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="YAML recipe (SparseML GMPruningModifier fields)")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PNG",
        help="PNG to write (default: RECIPE_schedule.png in the current directory)",
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=_positive(int),
        default=100,
        metavar="N",
        help="optimizer steps per epoch, which the x axis counts (default: 100)",
    )
    parser.add_argument(
        "--total-epochs",
        type=_positive(float),
        metavar="EPOCHS",
        help="epochs to draw (default: the recipe's total_epochs, else end_epoch + 10%%, >= 1)",
    )


def _default_total_epochs(schedule: GMPSchedule) -> float:
    """Without a training length, show a short fine-tuning tail so the last stage is visible."""
    return schedule.end_epoch + max(1.0, 0.1 * schedule.end_epoch)


def _table(schedule: GMPSchedule, points: list[float]) -> list[str]:
    cells = [f"{epoch:>8g}: {schedule.sparsity_at(epoch):.4f}" for epoch in points]
    return [" ".join(cells[i : i + _TABLE_COLUMNS]) for i in range(0, len(cells), _TABLE_COLUMNS)]


def _summary(recipe: Recipe, total_epochs: float) -> str:
    schedule = recipe.schedule
    interpolation = schedule.interpolation
    lines = [
        f"GMP schedule: {interpolation} interpolation, sparsity {schedule.init_sparsity:g} -> "
        f"{schedule.final_sparsity:g}, update every {schedule.update_frequency:g} epoch(s)"
    ]
    bounds = (0.0, schedule.start_epoch, schedule.end_epoch, max(total_epochs, schedule.end_epoch))
    stages = zip(("stabilization", "pruning", "fine-tuning"), bounds, bounds[1:])
    lines.append(
        "stages (epochs): "
        + ", ".join(f"{name} [{lo:g}, {hi:g})" for name, lo, hi in stages if hi > lo)
    )
    if recipe.lr is not None:
        decays = ", ".join(f"{m:g}" for m in recipe.lr.milestones) or "none"
        lines.append(f"learning rate: {recipe.lr.lr:g}, x{recipe.lr.gamma:g} at epochs: {decays}")
    points = schedule.update_points()
    lines.append(f"target sparsity at the {len(points)} update points (epoch: sparsity):")
    if len(points) > _MAX_TABLE_POINTS:
        half = _MAX_TABLE_POINTS // 2
        rows = [*_table(schedule, points[:half]), f"  ... {len(points) - 2 * half} more ..."]
        rows += _table(schedule, points[-half:])
    else:
        rows = _table(schedule, points)
    lines += rows
    return "\n".join(lines)


def _plot(args: argparse.Namespace) -> int:
    from gmp_ext.training.plotting import plot_schedule

    recipe = load_recipe(args.recipe)
    schedule = recipe.schedule
    total_epochs = args.total_epochs or recipe.total_epochs or _default_total_epochs(schedule)
    out = args.out or Path(f"{args.recipe.stem}_schedule.png")
    plot_schedule(schedule, total_epochs, args.steps_per_epoch, lr=recipe.lr, path=out)
    print(_summary(recipe, total_epochs))
    print(f"wrote {out}")
    return 0


def _plugin(name: str) -> Command | str | None:
    """The plugin's command, None if it is not installed, or why it fails to import."""
    module_name = f"gmp_ext.app.{name}"
    try:
        if importlib.util.find_spec(module_name) is None:
            return None
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return str(exc)
    first_line = (module.__doc__ or name).strip().splitlines()[0].rstrip(".")
    summary = first_line[:1].lower() + first_line[1:]  # in the style of the other commands
    return (summary, module.add_arguments, module.run)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and the plugins that are installed but fail to import, with the reason.

    Those are still listed, so that running one says why; they must not take the other commands
    down (``info`` exists to diagnose exactly such a broken install).
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="Gradual magnitude pruning for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", help=f"one of these; {PROG} COMMAND --help explains it"
    )
    commands: dict[str, Command] = {
        "info": ("print version, build and device information", lambda parser: None, _info),
        "plot": ("plot a recipe's sparsity and learning-rate schedule", _add_plot_arguments, _plot),
    }
    unavailable = {}
    for name in _PLUGINS:
        plugin = _plugin(name)
        if isinstance(plugin, str):
            unavailable[name] = plugin
            subparsers.add_parser(name, help=f"(unavailable: {plugin})")
        elif plugin is not None:
            commands[name] = plugin
    for name, (summary, add_arguments, run) in commands.items():
        subparser = subparsers.add_parser(name, help=summary, description=summary)
        add_arguments(subparser)
        subparser.set_defaults(_handler=run)
    return parser, unavailable


def _error(message: str) -> int:
    message = " ".join(message.split())
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gmp-ext``; returns the exit status instead of exiting, for testing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, unavailable = _parser()
    if argv and argv[0] in unavailable:  # before parsing: its options are unknown
        return _error(f"{argv[0]} is unavailable: {unavailable[argv[0]]}")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help (0) and usage errors (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args._handler(args)
    except (OSError, ValueError, ImportError) as exc:
        return _error(str(exc) or type(exc).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
