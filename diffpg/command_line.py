"""Parsing command lines into settings dataclasses (tyro), with one-line errors.

tyro builds the options from the dataclasses and the documentation under their fields. Its own
error messages are boxes of several lines; diffpg's are one line naming the setting. tyro 1.0
reports each parse error to a hook (``tyro._errors.on_parse_error``, not yet public API: hence
the exact version pin in pyproject.toml, and a test of the messages) that turns it into a
``CommandLineError``.

(No ``from __future__ import annotations`` here: the command dataclasses are built inside
functions, and tyro reads their annotations as objects.)
"""

import codecs
import contextlib
import dataclasses
import io
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import tyro
import tyro._errors as tyro_errors

from diffpg.envs.core import SettingError

T = TypeVar("T")

def _default_hint(meaning: str):
    """The help's "(default: ...)" of an option whose default, None, means ``meaning``."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {meaning})")


CONFIG = (tyro.conf.OmitArgPrefixes, tyro.conf.OmitSubcommandPrefixes,
          tyro.conf.CascadeSubcommandArgs)
"""Options without their dataclass's prefix (``--num-envs``, not ``--settings.num-envs``),
subcommands by their own name (``shac``), and options in any order around a subcommand."""


class CommandLineError(SettingError):
    """A command line that does not parse; its message is one line."""


class _OptionBeforeItsSubcommand(CommandLineError):
    """An estimator's option (``trigger_flag``) came before the estimator's name
    (``subcommand``); ``parse`` reads the command line again with the name first."""

    def __init__(self, subcommand: str, trigger_flag: str):
        super().__init__(f"{trigger_flag} comes before the estimator's name {subcommand!r}; put "
                         f"the name first: {subcommand} {trigger_flag} ...")
        self.subcommand, self.trigger_flag = subcommand, trigger_flag


def _subcommand_first(argv: list[str], subcommand: str, flag: str) -> list[str] | None:
    """``argv`` with ``subcommand`` (its first occurrence after ``flag``) moved to the front, or
    ``None`` when it is not there."""
    after = next((i for i, token in enumerate(argv)
                  if token == flag or token.startswith(flag + "=")), None)
    if after is None:
        return None
    at = next((i for i in range(after + 1, len(argv)) if argv[i] == subcommand), None)
    return None if at is None else [subcommand, *argv[:at], *argv[at + 1:]]


class _UnrecognizedArguments(CommandLineError):
    """Tokens no option takes; ``parse`` adds the options they are closest to."""

    def __init__(self, tokens: list[str], hint: str = ""):
        super().__init__("unrecognized arguments: " + " ".join(tokens) + hint)
        self.tokens = tokens


def _option_names(command_class: type) -> set[str]:
    """Every ``--option`` of ``command_class``: its dataclass fields, those of the dataclasses
    inside it, and every registered estimator's settings (the subcommands' options)."""
    from diffpg import estimators

    names, classes = set(), [command_class] + [estimators.registration(name).settings_class
                                               for name in estimators.names()]
    while classes:
        cls = classes.pop()
        names |= _own_options(cls)
        classes += [field.type for field in dataclasses.fields(cls)
                    if isinstance(field.type, type) and dataclasses.is_dataclass(field.type)]
    return names


def _own_options(settings_class: type) -> set[str]:
    """The ``--options`` of a dataclass's own fields."""
    return {"--" + field.name.replace("_", "-") for field in dataclasses.fields(settings_class)}


def _flag(token: str) -> str:
    """``--name`` of ``--name`` or ``--name=value`` (any other token unchanged)."""
    return token.split("=", 1)[0] if token.startswith("--") else token


def _did_you_mean(tokens: list[str], command_class: type, prog: str) -> str:
    """`` (did you mean --window?)`` for the unrecognized ``--options`` near another known one;
    for ``diffpg train``, a word near an estimator's name, and the old ``--estimator NAME``."""
    import difflib

    from diffpg import estimators

    if prog == "diffpg train" and any(_flag(token) == "--estimator" for token in tokens):
        return " (the estimator is now a word of its own: diffpg train --env ENV ESTIMATOR [its options])"

    owners = {name: [estimator for estimator in estimators.names() if name in _own_options(
        estimators.registration(estimator).settings_class)] for name in map(_flag, tokens)}
    owned = next((name for name in map(_flag, tokens) if owners[name]), None)
    if owned is not None:  # another estimator's option (an estimator's own is not unknown)
        where = ("after one of their names" if prog == "diffpg train" else
                 f"in --estimators as NAME:{owned[2:].replace('-', '_')}=VALUE")
        return f" ({owned} is a setting of {', '.join(owners[owned])}: give it {where})"
    known = sorted(_option_names(command_class))
    names = estimators.names() if prog == "diffpg train" else []
    guesses = [next(iter(matches)) for token in tokens
               if (matches := [match for match in difflib.get_close_matches(
                   _flag(token), known if token.startswith("--") else names, cutoff=0.75)
                   if match != _flag(token)])]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def _setting_name(argument) -> str:
    return argument.field.intern_name if argument is not None else ""


def _raise_one_line(event: Any) -> None:
    """tyro's parse-error hook: one line that names the setting."""
    if isinstance(event, tyro_errors.InstantiationFailure):
        lines = event.message.strip().splitlines() or ["invalid value"]
        name = _setting_name(event.argument)
        raise CommandLineError(f"{name}: {lines[0]}" if name else lines[0])
    if isinstance(event, tyro_errors.InvalidChoice):
        raise CommandLineError(f"{_setting_name(event.argument)}={event.value!r} is not "
                               f"allowed; allowed values: {', '.join(event.choices)}")
    if isinstance(event, tyro_errors.BadValue):
        raise CommandLineError(f"{_setting_name(event.argument)} needs "
                               f"{event.argument.lowered.nargs} value(s)")
    if isinstance(event, tyro_errors.MissingArgs):
        missing = ", ".join(_setting_name(a.arg) for a in event.missing_arguments)
        raise CommandLineError(f"missing: {missing}")
    if isinstance(event, tyro_errors.MissingSubcommand):
        raise CommandLineError("expected one of: "
                               + ", ".join(event.subcommand_spec.parser_from_name))
    if isinstance(event, tyro_errors.SubcommandConflict):
        raise _OptionBeforeItsSubcommand(event.attempted, event.trigger_flag)
    if isinstance(event, tyro_errors.UnrecognizedArgs):
        raise _UnrecognizedArguments(event.tokens)
    raise CommandLineError(f"invalid command line ({type(event).__name__})")


PATH_OPTIONS = ("--out", "--resume", "--policy-checkpoint")
"""The options that name a file or folder."""


def _check_words(argv: list[str]) -> None:
    """Refuse what the parser would read silently otherwise: ``--`` (the options after it
    become words), an empty path (the working folder), an option given twice (the last value
    kept), however spelt: ``--num-envs`` and ``--num_envs``, ``--layer-norm`` and
    ``--no-layer-norm``."""
    if "--" in argv:
        raise CommandLineError("'--' ends the options, so what follows it would be read as "
                               "words; leave it out (a path that starts with '-' is written "
                               "./-NAME)")
    for at, token in enumerate(argv):  # (an empty path reads as '.', the working folder)
        option = argv[at - 1] if token == "" and at else token[:-1] if token.endswith("=") else ""
        if option in PATH_OPTIONS or (token == "" and at == 0):
            name = option[2:].replace("-", "_") if option in PATH_OPTIONS else "run_dir"
            raise CommandLineError(f"{name}='' is an empty path (it would mean the working "
                                   "folder); give a folder's name")

    def option(token: str) -> str:
        name = _flag(token)[2:].replace("_", "-")
        return name.removeprefix("no-")

    given = [token for token in argv if token.startswith("--")]
    for at, token in enumerate(given):
        earlier = next((other for other in given[:at] if option(other) == option(token)), None)
        if earlier is not None:
            twice = (f"{_flag(token)} is given twice" if _flag(earlier) == _flag(token) else
                     f"{_flag(earlier)} and {_flag(token)} are one option given twice")
            raise CommandLineError(f"{twice}; give it once")


HELP_WIDTH_AT_MOST = 100
"""The help's widest line in a wide terminal (lines of text are read more easily short)."""


def help_width() -> int:
    """The columns the help is laid out in: the terminal's, at most ``HELP_WIDTH_AT_MOST``; below
    60 (where tyro lays its boxes out a few words a line: COLUMNS=20 gave 7,950 lines for diffpg
    train, narrower looped forever) the 80-column layout, which such a terminal wraps."""
    columns = shutil.get_terminal_size().columns
    return 80 if columns < 60 else min(columns, HELP_WIDTH_AT_MOST)


def fill_words(words: list[str], width: int, hanging: int = 0) -> str:
    """``words`` in lines of at most ``width`` columns, the lines after the first indented by
    ``hanging``; a word too long for a line (``{reinforce,ppo,...}``) is broken after its
    commas."""
    pieces = []  # (text, whether a space comes before it)
    for word in words:
        parts = word.split(",") if hanging + len(word) > width else [word]
        pieces += [(part + ("," if at < len(parts) - 1 else ""), at == 0)
                   for at, part in enumerate(parts)]
    lines, line = [], ""
    for text, spaced in pieces:
        joined = line + (" " if spaced and line.strip() else "") + text
        if line.strip() and len(joined) > width:
            lines.append(line)
            joined = " " * hanging + text
        line = joined
    return "\n".join([*lines, line])


def wrap_help(text: str, width: int) -> str:
    """tyro's help ``text`` with the lines above its first box (the usage line, the
    description) filled to ``width``: the usage continued under ``usage: diffpg train``'s end (a
    word too long for that, under ``usage:``), each paragraph of the description as one. The
    boxes are laid out in ``width`` already."""
    lines = text.splitlines()
    plain = [_ANSI_CODE.sub("", line) for line in lines]
    first_box = next((at for at, line in enumerate(plain) if line.lstrip().startswith("╭")
                      or plain[at + 1:at + 2] and set(plain[at + 1].strip()) == {"-"}),
                     len(lines))
    head, paragraph = [], []
    for line in plain[:first_box] + [""]:
        if line.strip():
            paragraph.append(line)
            continue
        if paragraph:
            words = " ".join(paragraph).split()
            hanging = len(" ".join(words[:3])) + 1 if words[0] == "usage:" else 0
            if hanging + max(map(len, words)) > width:
                hanging = 4
            head.append(fill_words(words, width, hanging))
            paragraph = []
        head.append(line)
    return "\n".join(line.rstrip() for line in head[:-1] + lines[first_box:]) + (
        "\n" if text.endswith("\n") else "")


_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


class _HelpCapture(io.TextIOWrapper):
    """What tyro prints, kept to be wrapped: it lays the help out as for ``stream`` (box
    characters in its encoding, colours in a terminal)."""

    def __init__(self, stream):
        super().__init__(io.BytesIO(), encoding=codecs.lookup(  # ("UTF-8" is "utf-8" to tyro)
            getattr(stream, "encoding", None) or "utf-8").name, errors="replace",
                         write_through=True)
        self._stream = stream

    def isatty(self) -> bool:
        return self._stream.isatty()

    def text(self) -> str:
        return self.buffer.getvalue().decode(self.encoding, errors="replace")


def parse(command_class: type[T], argv: list[str], prog: str, default: T | None = None) -> T:
    """``command_class`` from ``argv``; ``--help`` prints its options (``help_width()`` columns
    wide) and exits (status 0)."""
    _check_words(argv)
    width, columns = help_width(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # tyro lays its boxes out in it
    printed = _HelpCapture(sys.stdout)
    try:
        with tyro_errors.on_parse_error(_raise_one_line), contextlib.redirect_stdout(printed):
            return tyro.cli(command_class, args=argv, prog=prog, default=default, config=CONFIG)
    except _UnrecognizedArguments as error:
        raise _UnrecognizedArguments(error.tokens, _did_you_mean(error.tokens, command_class, prog)
                                     ) from None
    except _OptionBeforeItsSubcommand as error:  # options go anywhere, as the help says
        reordered = _subcommand_first(argv, error.subcommand, error.trigger_flag)
        if reordered is None:
            raise
        return parse(command_class, reordered, prog, default)
    except ValueError as error:  # a dataclass's own validation, raised while building it
        if isinstance(error, CommandLineError):
            dashed = next((token for token in argv if token.startswith("-") and token != "-"
                           and Path(token).exists()), None)
            if dashed is None:
                raise
            raise CommandLineError(f"{error} ({dashed!r} reads as an option; a path that starts "
                                   f"with '-' is written ./{dashed})") from None
        raise CommandLineError(str(error).strip().splitlines()[0]) from error
    finally:  # the help tyro printed (nothing else prints here)
        sys.stdout.write(wrap_help(printed.text(), width))
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


# ----------------------------------------------------------------------------- diffpg train

def _values_taken(hint: Any) -> int:
    """How many values an option of type ``hint`` takes: 0 (a bool: ``--x``/``--no-x``), 1, or 2
    (one or more: a tuple or a list)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _values_taken(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        return max(_values_taken(arg) for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        return 0
    return 2 if origin in (tuple, list) else 1


def _options_of(settings_classes: list[type]) -> dict[str, int]:
    """Every ``--option`` the classes' fields give on the command line (tyro's names: the
    field's, dashed; a bool's ``--no-`` form too), with the values it takes."""
    options = {}
    for settings_class in settings_classes:
        try:
            hints = typing.get_type_hints(settings_class, include_extras=True)
        except Exception:  # a user's class with an annotation that does not resolve
            hints = {}
        for field in dataclasses.fields(settings_class):
            taken = _values_taken(hints.get(field.name, str))
            flag = "--" + field.name.replace("_", "-")
            options[flag] = taken
            if taken == 0:
                options["--no-" + field.name.replace("_", "-")] = 0
    return options


def _leading_choices(command_class: type, argv: list[str]) -> dict[str, Any]:
    """What the defaults of ``diffpg train`` depend on, found in ``argv`` before it is parsed:
    ``env``, ``resume`` and ``sizes`` as given (absent when not given), and ``estimator``, the
    estimator word (``None``: none). Each option skips the values it takes, as tyro reads them
    (``--out shac shac``: a folder named shac, then the estimator; ``--hidden-sizes 64 64
    shac``: the sizes end at the estimator's name); the one parse that follows reads the same
    grammar and is checked to agree."""
    from diffpg import estimators
    from diffpg.training import TrainSettings

    names = set(estimators.names())
    options = _options_of([command_class, TrainSettings] + [
        estimators.registration(name).settings_class for name in estimators.names()])
    given: dict[str, Any] = {"estimator": None}
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("--"):
            if token in names and given["estimator"] is None:
                given["estimator"], given["estimator_index"] = token, index - 1
            continue
        flag, has_value, value = token.partition("=")
        taken = options.get(flag, 1)
        if has_value or taken == 0:
            values = [value] if has_value else []
        else:
            values = []
            while index < len(argv) and not argv[index].startswith("--") and (
                    taken == 1 and not values or taken == 2 and argv[index] not in names):
                values.append(argv[index])
                index += 1
        if flag in ("--env", "--resume", "--sizes") and values:
            given[flag[2:]] = values[-1]
    return given


def parse_train_command(argv: list[str]):
    """``diffpg train`` arguments -> ``(settings, out, overwrite, resume, sizes)``.

    The defaults under the user's options are the environment's configuration for the chosen
    estimator (``diffpg.training.settings_for``), or, with ``--resume RUN``, the run's own
    settings, of which only ``CHANGEABLE_ON_RESUME`` may change.
    """
    from diffpg import configs
    from diffpg.run_files import load_settings
    from diffpg.training import CHANGEABLE_ON_RESUME, TrainSettings, settings_for

    @dataclasses.dataclass(frozen=True)
    class TrainCommand:
        """Train a policy; writes settings.json, metrics.csv and checkpoints into --out. The
        estimator is a subcommand with its own settings, e.g. `diffpg train --env hopper shac
        --window 16`; without one, the env's configured estimator."""

        settings: TrainSettings
        out: Annotated[Path | None, _default_hint("runs/train-ENV-ESTIMATOR-TIMESTAMP")] = None
        """Run folder."""
        overwrite: bool = False
        """Write into --out even if it holds files (an earlier run there is replaced)."""
        resume: Annotated[Path | None, _default_hint("a new run")] = None
        """Continue RUN_DIR from its latest checkpoint, with its settings (--updates may grow)."""
        sizes: Literal["cpu", "gpu"] = "cpu"
        """Sizes of the env's configuration (diffpg/configs.py): cpu or gpu (more envs)."""

    given = _leading_choices(TrainCommand, argv)
    named_estimator, resume = given["estimator"], given.get("resume")
    if named_estimator is not None:  # (tyro keeps both: --horizon before is the run's, after
        at = given["estimator_index"]  # the estimator's, which wins)
        before = {_flag(token) for token in argv[:at] if token.startswith("--")}
        twice = [_flag(token) for token in argv[at + 1:] if _flag(token) in before]
        if twice:
            raise CommandLineError(f"{twice[0]} is given twice, before and after the estimator's "
                                   f"name {named_estimator!r}; give it once")
    _check_words(argv)  # (before the run or the env's configuration is read)
    if resume is not None:
        base = load_settings(Path(resume))
        if named_estimator not in (None, base.estimator):
            raise CommandLineError(f"estimator cannot change when resuming (the run has "
                                   f"estimator={base.estimator!r}); leave out "
                                   f"{named_estimator!r}, or start a new run with it")
    else:
        env = given.get("env", TrainSettings.__dataclass_fields__["env"].default)
        sizes = given.get("sizes", TrainCommand.sizes)
        configs.check_sizes(sizes)
        base = settings_for(env, named_estimator or configs.default_estimator(env), sizes=sizes)
    command = parse(TrainCommand, argv, "diffpg train", default=TrainCommand(settings=base))
    settings = command.settings
    if resume is None and (settings.env, settings.estimator) != (base.env, base.estimator):
        # (a safeguard: the defaults were the configuration of what the scan found)
        raise CommandLineError(f"the command line reads as env={settings.env!r} with "
                               f"estimator={settings.estimator!r}, but its defaults were taken "
                               f"for env={base.env!r} with estimator={base.estimator!r}; give "
                               "--env ENV once, as its own word, and the estimator's name")
    if resume is not None:
        for field in dataclasses.fields(TrainSettings):
            value, kept = getattr(settings, field.name), getattr(base, field.name)
            if value != kept and field.name not in CHANGEABLE_ON_RESUME:
                raise CommandLineError(f"{field.name} cannot change when resuming (the run has "
                                       f"{field.name}={kept!r}); allowed to change: "
                                       f"{', '.join(CHANGEABLE_ON_RESUME)}")
        check_resume(Path(resume), settings.updates, command.out, command.overwrite)
    out = Path(resume) if resume is not None else command.out
    return settings, out, command.overwrite, resume is not None, command.sizes


def check_resume(run_dir: Path, updates: int, out: Path | None, overwrite: bool) -> None:
    """What ``--resume RUN`` cannot be combined with: another ``--out`` (the run continues in
    its own folder), ``--overwrite``, or fewer ``--updates`` than its newest checkpoint has
    done (settings.json would then disagree with its checkpoints)."""
    from diffpg.checkpoints import checkpoint_updates
    from diffpg.run_files import check_rewritable

    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise CommandLineError(f"out={str(out)!r} cannot be given with resume={str(run_dir)!r}: "
                               "a run continues in its own folder; leave out --out")
    if overwrite:
        raise CommandLineError("overwrite cannot be given with resume (resuming keeps the run); "
                               "leave out one of them")
    done = checkpoint_updates(run_dir)
    if done and updates < done[-1]:
        raise CommandLineError(f"updates={updates} is below the {done[-1]} updates the run has "
                               f"done (its newest checkpoint); allowed: updates >= {done[-1]}")
    check_rewritable(run_dir)


def parse_compare_command(argv: list[str]):
    """``diffpg compare`` arguments -> ``(settings, out, overwrite, resume)``; with ``--resume
    DIR`` the settings are DIR's own (``comparison_files.load_finished_points``) and ``out`` is DIR."""
    from diffpg.comparison_settings import CompareSettings

    @dataclasses.dataclass(frozen=True)
    class CompareCommand:
        """Compare gradient estimators on the same policy and start states; writes
        results.json, table.csv, plots and report.md into --out."""

        settings: CompareSettings = CompareSettings()
        out: Annotated[Path | None, _default_hint("runs/compare-ENV-TIMESTAMP")] = None
        """Output folder."""
        overwrite: bool = False
        """Write into --out even if it holds files."""
        resume: Annotated[Path | None, _default_hint("a new comparison")] = None
        """A stopped comparison's folder: compute the sweep points it has not finished, with its
        own settings (give no other option), and write its report."""

    command = parse(CompareCommand, argv, "diffpg compare")
    if command.resume is None:
        return command.settings, command.out, command.overwrite, None
    given = [name for name, value in (("out", command.out), ("overwrite", command.overwrite))
             if value] + [field.name for field in dataclasses.fields(CompareSettings)
                          if getattr(command.settings, field.name)
                          != getattr(CompareSettings(), field.name)]
    if given:
        raise CommandLineError(f"{given[0]} cannot be given with resume={str(command.resume)!r}: "
                               "a resumed comparison keeps its folder and its settings")
    from diffpg.comparison_files import load_finished_points

    settings, finished = load_finished_points(command.resume)
    return settings, command.resume, False, finished


def parse_run_command(argv: list[str], prog: str, video: bool = False):
    """``diffpg eval RUN_DIR`` and ``diffpg video RUN_DIR [--out] [--every]``."""

    @dataclasses.dataclass(frozen=True)
    class EvalCommand:
        """Evaluate a checkpoint of a training run (the latest, with the run's evaluation key:
        its last logged evaluation again, unless told otherwise)."""

        run_dir: tyro.conf.Positional[Path]
        """A training run's folder."""
        episodes: Annotated[int | None, _default_hint("the run's eval_envs")] = None
        """Episodes to evaluate, each from its own start."""
        seed: Annotated[int | None, _default_hint("the run's own, seed + 1")] = None
        """Seed of the evaluation's starts and keys."""
        checkpoint: Annotated[int | None, _default_hint("the newest that restores")] = None
        """Update of the checkpoint to evaluate."""

    @dataclasses.dataclass(frozen=True)
    class VideoCommand:
        """An animated GIF of one episode of a training run's latest policy (deterministic)."""

        run_dir: tyro.conf.Positional[Path]
        """A training run's folder."""
        out: Annotated[Path | None, _default_hint("RUN_DIR/policy.gif")] = None
        """GIF path."""
        every: int = 1
        """Draw every N-th step (long episodes)."""
        seed_index: int = 0
        """Which seed of a run trained with --seeds N to draw (0..N-1)."""

    return parse(VideoCommand if video else EvalCommand, argv, prog)
