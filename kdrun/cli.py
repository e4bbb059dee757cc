"""The `kdrun` command: compose the Hydra config, call :func:`kdrun.run.run`, report errors as one line.

Nothing below this module imports Hydra or depends on the working directory. torch is imported lazily
(inside the job), so ``kdrun --help`` stays fast.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from kdrun.errors import InputError, Interrupted, KdrunError
from kdrun.listing import config_groups
from kdrun.memo import MEMO
from kdrun.records import space_message
from kdrun.schema import keys_at
from kdrun.schema.configstore import register_configs


class ClaimRunDir(Callback):
    """``hydra.callbacks.run_dir`` (conf/config.yaml): claim the run dir before Hydra writes into it.

    Hydra writes ``.hydra/*.yaml`` and opens the log before the job runs, so the claim (:mod:`kdrun.rundir`)
    happens here, after the config's checks (:func:`validate`: a refused config leaves no dir). A timestamped
    dir (``${now:...}``, the default) another run holds becomes the next free ``<dir>-N``; any other dir that
    is held or holds results is refused, and Hydra then writes no ``.hydra/`` (a finished run's files stay as
    they are). Hydra turns a callback's exception into a warning, so the
    refusal is kept in ``MEMO.refused`` (:mod:`kdrun.memo`) for :func:`_job` and :func:`main`.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from omegaconf import OmegaConf, read_write

        from kdrun.rundir import claim

        if not MEMO.resume:  # a config run() would refuse: refused here, before any file exists
            validate(config)
        unresolved = str(OmegaConf.to_container(config.hydra.run, resolve=False).get("dir", ""))
        try:
            path = claim(Path(str(config.hydra.run.dir)), fresh="${now:" in unresolved,
                         resume=MEMO.resume)
        except KdrunError as exc:
            MEMO.refused.append(exc)
            with read_write(config.hydra):
                config.hydra.output_subdir = None
            return
        with read_write(config.hydra):
            config.hydra.run.dir = str(path)
        MEMO.run_dirs.append(path)


class Refused(BaseException):
    """A run refused for its config (:func:`validate`) or a sweep refused before its first job
    (:class:`RecordSweepDir`); :func:`main` says why in one line. Not an ``Exception``: Hydra would turn that into
    a warning and go on."""


def validate(config: DictConfig) -> None:
    """The range and cross-key checks :func:`kdrun.run.run` makes first (:func:`kdrun.schema.to_object`), made on
    the composed ``config`` before the run dir is claimed, so that a refused config leaves no run dir (Hydra
    writes ``.hydra/`` and the log before the job). A :class:`KdrunError` raises :class:`Refused`; anything else
    is left to the job, which meets it again."""
    from omegaconf import open_dict, read_write

    from kdrun.schema import to_object

    task = config.copy()
    with read_write(task), open_dict(task):
        del task["hydra"]
    try:
        to_object(task)
    except KdrunError as exc:
        raise Refused(exc) from None
    except Exception:  # noqa: BLE001,S110 - e.g. an interpolation that needs the job: the job reports it
        pass


class RecordSweepDir(Callback):
    """``hydra.callbacks.sweep_dir`` (conf/config.yaml): claim and remember the sweep dir when a multirun starts.

    :func:`main` summarises it after the multirun, also when a job crashed: Hydra then skips
    ``on_multirun_end``, so the summary cannot live there. A timestamped sweep dir (``${now:...}``, the
    default) that exists already (another sweep started in the same second) is replaced by the next free
    ``<dir>-N`` (:func:`kdrun.rundir.fresh_dir`); the jobs' configs are recomposed from the hydra overrides,
    so the new dir is added to them as ``hydra.sweep.dir=<dir>-N``. A sweep dir that cannot be created or written
    is refused before any job runs (kept in ``MEMO.refused``; :func:`main` says it as one line, exit 2). A sweep
    whose job dirs another running sweep holds (the same dir and ``hydra.sweep.subdir``:
    :func:`kdrun.rundir.claim_sweep`) is refused, exit 2.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from omegaconf import OmegaConf, read_write

        from kdrun.rundir import claim_sweep, fresh_dir, release, writable_dir

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            if "${now:" in str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("dir", "")):
                fresh = fresh_dir(sweep_dir)
                if fresh != sweep_dir:
                    with read_write(config.hydra):
                        config.hydra.sweep.dir = str(fresh)
                        config.hydra.overrides.hydra.append(f"hydra.sweep.dir={fresh}")
                    sweep_dir = fresh
            writable_dir(sweep_dir)
        except KdrunError as exc:  # Hydra would turn it into a warning: kept for main(), which says it as one line
            MEMO.refused.append(exc)
            return
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", ""))
        try:
            claim_file = claim_sweep(sweep_dir, subdir)
        except KdrunError as exc:  # another sweep runs these job dirs: stop before the first job
            raise Refused(exc) from None
        atexit.register(release, claim_file)
        MEMO.sweep_dirs.append(sweep_dir.resolve())


@hydra.main(version_base="1.3", config_path="pkg://kdrun.conf", config_name="config")
def _job(cfg: DictConfig) -> float:
    """One Hydra job: a run in its own output dir. Returns the objective (student best val acc).

    A user error (:class:`KdrunError`) is recorded in ``summary.json`` by ``run`` and reported by :func:`main`
    as one line; the other jobs of a sweep still run. Anything else propagates with its traceback.
    SIGINT / SIGTERM stop the job at a safe point (:mod:`kdrun.train.interrupt`) and the sweep with it. In a sweep run
    again into its dir, a job completed with the same config is skipped and an unfinished one resumed.
    """
    from kdrun.resume import earlier_attempt
    from kdrun.run import run
    from kdrun.train import interrupt

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if MEMO.refused:  # the run dir is another run's (ClaimRunDir): write nothing into it
        MEMO.failed_jobs.append((out_dir, MEMO.refused.pop()))
        return float("nan")
    if MEMO.resumed_from is not None:  # code named by the run dir's overrides: only what the user trusts
        try:
            check_resumed_targets(cfg)
        except KdrunError as exc:
            MEMO.failed_jobs.append((out_dir, exc))
            return float("nan")
    resume = MEMO.resume
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweep run again into its dir: finish what is not done
        earlier = earlier_attempt(out_dir, cfg, HydraConfig.get().overrides.task)
        if earlier is not None and earlier.get("status") == "completed":
            logging.getLogger("kdrun").info(f"job {out_dir}: completed by an earlier run of this sweep; skipped")
            return earlier.get("objective", float("nan"))
        resume = resume or earlier is not None
    if interrupt.requested():  # an interrupted sweep starts no further job
        return float("nan")
    try:
        with interrupt.stop_on_signals():
            return run(cfg, out_dir, resume=resume, overrides=HydraConfig.get().overrides.task)["objective"]
    except Interrupted as exc:  # recorded in summary.json; main() reports it (not raised: Hydra would add a line)
        MEMO.interrupted.append((out_dir, exc))
        return float("nan")
    except KdrunError as exc:
        MEMO.failed_jobs.append((out_dir, exc))
        if not (out_dir / "summary.json").exists():  # refused before it started: say why in the job's log
            logging.getLogger("kdrun.file").error(f"job refused: {exc}")
        return float("nan")


def _resume_argv(argv: list[str]) -> list[str]:
    """``kdrun resume=DIR [more]`` (or ``--resume DIR``): ``more``, then the run's own overrides (they win) and its
    run dir. The overrides are kept in :data:`MEMO` for :func:`check_resumed_targets`."""
    from kdrun.resume import resume_overrides

    for i, arg in enumerate(argv):
        if arg.startswith("resume=") or (arg == "--resume" and i + 1 < len(argv)):
            value, rest = (arg.partition("=")[2], argv[i + 1:]) if arg.startswith("resume=") else \
                (argv[i + 1], argv[i + 2:])
            if not value.strip():
                raise InputError("resume: name the run dir to continue: kdrun resume=outputs/YYYY-MM-DD/HH-MM-SS")
            run_dir = Path(value).resolve()
            saved = run_dir / ".hydra" / "overrides.yaml"
            overrides = resume_overrides(run_dir)
            screen_overrides(overrides[:-1], saved)
            MEMO.resumed_from, MEMO.resumed_overrides = saved, overrides[:-1]
            return [*argv[:i], *rest, *overrides]
    return argv


def _exit_if_complete(run_dir: Path) -> None:
    """``kdrun resume=DIR`` of a complete run (:func:`kdrun.resume.completed`): one line, exit 0, before Hydra writes
    anything into it: nothing is trained, reported, exported or tracked again."""
    from kdrun.resume import completed

    if (finished := completed(run_dir)) is not None:
        print(f"kdrun: {run_dir} is complete (finished at {finished}); nothing to resume")
        sys.exit(0)


def _is_hydra(path: str) -> bool:
    """Whether a key, group or package path lies under ``hydra`` (``hydra``, ``hydra.x``, ``hydra/x``,
    ``_global_.hydra.x``)."""
    first = re.split(r"[./]", path.removeprefix("_global_."), maxsplit=1)[0]
    return first == "hydra"


def screen_overrides(overrides: list[str], source: Path) -> None:
    """Refuse the overrides of a run dir's ``source`` (``.hydra/overrides.yaml``) that set anything under
    ``hydra`` (callbacks, launcher, sweeper, logging, run and sweep dirs: Hydra runs or writes them before the
    job) or that Hydra cannot parse. Parsed by Hydra's own parser, so what is checked is what Hydra reads.

    Refused, not dropped: kdrun's runs never write a ``hydra`` override into that file (Hydra keeps them in
    ``hydra.yaml``), so one there was put by hand, and resuming without it would hide that."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, refused = OverridesParser.create(), []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as exc:
            raise InputError(f"resume: {source} holds an override Hydra cannot parse: {text} "
                             f"({_first_line(str(exc))})") from None
        if _is_hydra(override.key_or_group) or _is_hydra(override.package or ""):
            refused.append(text)
    if refused:
        raise InputError(f"resume: {source} sets Hydra's own settings, which kdrun never takes from a run dir: "
                         f"{', '.join(refused)}; remove them from that file to resume")


def check_resumed_targets(cfg: DictConfig) -> None:
    """``kdrun resume=DIR``: refuse a ``_target_`` of the composed config that neither the user's config dirs nor
    the user's own overrides name, unless ``--trust-code`` (:mod:`kdrun.trust`). Checked on the config
    :func:`kdrun.run.run` gets, resolved as it will resolve it."""
    from collections import Counter

    from omegaconf import OmegaConf

    from kdrun import trust

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - run() fails on it before importing anything; still check what is written
        resolved = OmegaConf.to_container(cfg, resolve=False)
    hydra_cfg = HydraConfig.get()
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as given: "${...}" unresolved
    own = list((Counter(task) - Counter(MEMO.resumed_overrides)).elements())
    dirs = trust.user_config_dirs(hydra_cfg.runtime.config_sources)
    trusted = trust.Trusted(tuple(dirs), tuple(_override_targets(own)), MEMO.trust_code)
    trusted.check(trust.targets(resolved), f"resume: {MEMO.resumed_from}")


def _override_targets(overrides: list[str]) -> list[str]:
    """The ``_target_`` values that command-line ``overrides`` set (``a._target_=x`` or ``a={_target_: x}``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from kdrun.trust import targets

    parser, found = OverridesParser.create(), []
    for text in overrides:
        try:
            override = parser.parse_override(text)
            value = override.value()
        except HydraException:
            continue
        if override.key_or_group.split(".")[-1] == "_target_":
            found.append(str(value))
        found += [str(v) for _, v in targets(value)]
    return found


RUN_FILES = ("summary.json", "report.md", "kdrun.log")       # what a person opens first, in that order
SWEEP_FILES = ("summary.md", "results.csv", "results.png")


def results_line(path: Path, names: tuple[str, ...] = RUN_FILES) -> str | None:
    """``results: DIR (files)``: where a run (or a sweep, ``names=SWEEP_FILES``) put its results, ``DIR`` relative
    to the working directory when under it, with those of ``names`` it holds; None when it holds none."""
    present = [name for name in names if (path / name).is_file()]
    if not present:
        return None
    try:
        shown = Path(path).resolve().relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        shown = Path(path)
    return f"results: {shown} ({', '.join(present)})"


def _say_where(stream) -> None:
    """The results line of every run dir and sweep dir of this command (:func:`results_line`), on ``stream``:
    stdout after a completed run, stderr just before the error line of a failed or interrupted one."""
    lines = [results_line(d) for d in MEMO.run_dirs] + [results_line(d, SWEEP_FILES) for d in MEMO.summarized]
    for line in filter(None, lines):
        print(f"kdrun: {line}" if stream is sys.stderr else line, file=stream, flush=True)


def _report_interrupted(sweep: bool) -> None:
    """One line on stderr, exit 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    _summarize_sweeps()
    _say_where(sys.stderr)
    out_dir, exc = MEMO.interrupted[0]
    hint = "the same command again (completed jobs are skipped)" if sweep else f"kdrun resume={out_dir}"
    print(f"kdrun: {exc}; resume with: {hint}", file=sys.stderr)
    sys.exit(exc.exit_code)


def explain(exc: BaseException, argv: list[str] | None = None) -> str | None:
    """A one-line, key-naming message for a config or user error; None for anything else (a bug). ``argv``: the
    command's arguments, for a message that shows the command to type instead (default: ``sys.argv[1:]``)."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
        SearchPathException,
    )
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(exc, KdrunError):
        return str(exc)
    if (full := space_message(exc, MEMO.run_dirs[-1] if MEMO.run_dirs else None)) is not None:
        return full  # Hydra writing .hydra/ or its log into the run dir
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, name = exc.missing_cfg_file.rsplit("/", 1)
        return f"{group}: unknown value {name!r}; choose one of: {', '.join(exc.options or [])}"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override: {_first_line(str(exc))}"
    cause = exc.__cause__ if isinstance(exc, ConfigCompositionException) else exc
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        parent, _, leaf = cause.full_key.rpartition(".")
        valid = keys_at(parent)
        object_type = getattr(cause, "object_type", None)  # a per-option schema (loss, mode): its own keys
        if valid is None and dataclasses.is_dataclass(object_type):
            valid = [f.name for f in dataclasses.fields(object_type)]
        where = f"'{parent}'" if parent else "the top level"
        hint = f"; valid keys under {where}: {', '.join(valid)}" if valid else ""
        if parent.endswith(".args"):
            hint = "; the model's args are listed by `kdrun --list models`"
        if owners := key_owners(cause.full_key):  # `mode.generations=3` without `mode=self`
            hint += f"; it is a key of {owners[0]}: choose {owners[0]}" if len(owners) == 1 else \
                f"; it is a key of {', '.join(owners)}: choose one of them"
        return f"{cause.full_key}: unknown config key{hint}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        if "is not a ListConfig" in cause.msg:  # `export=onnx`: a list-valued key given one bare value
            return f"{cause.full_key}: takes a list: {cause.full_key}=[{cause.value}]"
        return f"{cause.full_key}: {_first_line(cause.msg)}"
    if isinstance(exc, ConfigCompositionException):
        text = str(exc)
        match = re.match(r"(?:Ambiguous value for argument|Sweep parameters) '([^']+)'", text)
        if match:  # `loss.T=1,4` without -m
            args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")]
            list_form = re.sub(r"=(.*)$", r"=[\1]", match.group(1)) if "Ambiguous" in text else None
            also = f" (or, where a list is meant: {list_form})" if list_form else ""
            return f"{match.group(1)}: several values: a sweep over them needs -m: kdrun -m {shlex.join(args)}{also}"
        match = re.search(r"Could not override '([^']+)'", text)
        if match and "No match in the defaults list" in text:
            return f"{match.group(1)}: unknown config group or key (see `kdrun --help`)"
        return _first_line(text)
    if isinstance(exc, OmegaConfBaseException):
        return _first_line(str(exc))
    if isinstance(exc, SearchPathException):  # --config-dir DIR that is not there
        return f"--config-dir: {_first_line(str(exc))}"
    if isinstance(exc, ValueError) and str(exc).startswith("Only one of --run, --multirun"):  # Hydra's own options
        return (f"{_first_line(str(exc)).rstrip('.')}: --cfg and --info show one run's config, so drop -m (each "
                f"job of a sweep writes its own config.yaml into its dir)")
    if isinstance(exc, ValueError) and str(exc).startswith("Config group override must be"):  # `=3`: no key
        bad = next((a for a in (sys.argv[1:] if argv is None else argv) if a.startswith("=")), None)
        return f"cannot parse override{f' {bad!r}' if bad else ''}: no key before '=' (key=value)"
    if isinstance(exc, ValueError) and str(exc).startswith("The --resolve flag"):
        return f"{_first_line(str(exc))}: kdrun --cfg job --resolve"
    return None


OWNER_KINDS = {"loss": "loss", "mode": "mode", "dataset": "dataset", "teacher": "model", "student": "model"}


def key_owners(full_key: str) -> list[str]:
    """The options that declare the unknown key ``full_key``: ``mode.generations`` -> ``["mode=self"]``,
    ``student.args.width_mult`` -> ``["student=mobilenet"]`` (from the registry, plugins included)."""
    from kdrun import registry

    group, *rest = full_key.split(".")
    kind = OWNER_KINDS.get(group)
    if kind == "model":
        rest = rest[1:] if rest[:1] == ["args"] else []
    if kind is None or not rest:
        return []
    return [f"{group}={name}" for name, entry in registry.entries(kind).items() if rest[0] in entry.params()]


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text))


def _list(what: str, rest: list[str] = ()) -> int:
    """``kdrun --list WHAT``: every option of a config group with the values a run of it uses, built-ins and
    plugins, each with its source; ``kdrun --list layers MODEL [overrides]``: a model's layers and their output
    shapes (:mod:`kdrun.listing`)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from kdrun import listing

    if what != "layers" and listing.ALIASES.get(what, what) not in listing.LISTS:
        print(f"kdrun: error: --list: unknown value {what!r}; choose one of: {', '.join([*listing.LISTS, 'layers'])}",
              file=sys.stderr)
        return 2
    if what == "layers":
        if not rest or "=" in rest[0] or rest[0].startswith("-"):
            print("kdrun: error: --list layers: name a model (`kdrun --list models`), or teacher or student for the "
                  "configured one: kdrun --list layers cnn [dataset=NAME]", file=sys.stderr)
            return 2
        title, found = listing.layers(rest[0], rest[1:])
        table = Table(title=escape(title))
        for column in ("name", "output shape", "default use (loss=at, loss=fitnet)"):
            table.add_column(column, no_wrap=column == "name")
        for name, shape, use in found:
            table.add_row(name, "x".join(map(str, shape)) if shape else "(not run, or not a tensor)", use)
    else:
        if rest:
            print(f"kdrun: error: --list {what} takes no overrides (only --list layers does)", file=sys.stderr)
            return 2
        group, found = listing.rows(what)
        role = {"student": "teacher=NAME or student=NAME; keys under teacher.* / student.*",
                "experiment": "experiment=NAME; what each preset changes in the default config"}.get(
                    group, f"{group}=NAME; keys under {group}.*")
        table = Table(title=f"kdrun {listing.ALIASES.get(what, what)} ({role})")
        table.add_column("name", no_wrap=True)  # names are what users type: never cut
        table.add_column("description")
        table.add_column("defaults (what a run of it uses)")
        table.add_column("source", no_wrap=True)
        for row in found:
            table.add_row(row.name, escape(row.description), escape(row.shown(group) or "-"), row.source)
    Console().print(table)  # a plugin that failed to load was warned about once, when it was loaded
    return 0


def _help(overrides: list[str]) -> int:
    """``kdrun --help [overrides]``: the header, every group with its options, the composed config, examples.

    Rendered here rather than by Hydra's ``--help``, which rebuilds its config repository for every group and
    lists the internal ``schema/`` groups (it still serves ``--help`` together with ``--config-dir``)."""
    from importlib.resources import files

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    text = OmegaConf.load(str(files("kdrun.conf") / "hydra" / "help" / "kdrun.yaml"))
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    groups = "\n".join(f"{group}: {', '.join(options)}" for group, options in config_groups().items())
    print(f"{text.header}\n\n== Config groups (choose one option each: group=option) ==\n{groups}\n\n"
          f"== Config ==\n{OmegaConf.to_yaml(cfg)}\n{text.footer}")
    return 0


def _one_line(command) -> int:
    """``command()``'s exit code; a config or user error (a bad override next to ``--help`` or ``--list layers``)
    is one line, exit 2, as for a run."""
    try:
        return command()
    except Exception as exc:  # noqa: BLE001 - anything not explained is re-raised with its traceback
        message = explain(exc)
        if message is None:
            raise
        print(f"kdrun: error: {message}", file=sys.stderr)
        return 2


def _summarize_sweeps() -> int:
    """Summarise the sweeps this process ran (results.csv, summary.md, results.png, tables); return the
    number of failed jobs (not of missing ones: another process may be running them into the same dir).
    A problem here is reported and never hides the sweep's own outcome."""
    from kdrun.sweep import summarize

    failed = 0
    while MEMO.sweep_dirs:
        sweep_dir = MEMO.sweep_dirs.pop(0)
        MEMO.summarized.append(sweep_dir)
        try:
            failed += sum(job.status == "failed" for job in summarize(sweep_dir).jobs)
        except Exception as exc:  # noqa: BLE001 - the jobs' results are on disk: kdrun-summarize can retry
            print(f"kdrun: warning: could not summarise {sweep_dir} ({type(exc).__name__}: {exc}); "
                  f"run `kdrun-summarize {sweep_dir}`", file=sys.stderr)
    return failed


def shadowing() -> str | None:
    """Why the ``kdrun`` package Python imported is not the one this module belongs to, or None. A folder named
    ``kdrun`` earlier on ``sys.path`` (``PYTHONPATH``, the current directory) takes the package's name, while its
    modules still come from the installed kdrun: things fail later with "cannot import name ... from 'kdrun'".
    (A folder without this module cannot run this check: there ``import kdrun.cli`` itself fails.)"""
    package = sys.modules.get("kdrun")
    own = Path(__file__).resolve().parent
    found = getattr(package, "__file__", None)
    if found is not None and Path(found).resolve().parent == own:
        return None
    where = Path(found).parent if found else ", ".join(getattr(package, "__path__", [])) or "?"
    return (f"the folder {where} shadows the kdrun package at {own}: Python imports it as `kdrun` because it comes "
            f"first on sys.path (PYTHONPATH or the current directory); rename it or take it off PYTHONPATH")


def main() -> None:
    """Entry point of `kdrun` and `python -m kdrun`."""
    from kdrun.trust import TRUST_FLAG

    if (shadowed := shadowing()) is not None:
        print(f"kdrun: error: {shadowed}", file=sys.stderr)
        sys.exit(2)
    argv = sys.argv[1:]
    if TRUST_FLAG in argv:  # kdrun's own option (kdrun.trust), not Hydra's
        MEMO.trust_code = True
        sys.argv[1:] = argv = [a for a in argv if a != TRUST_FLAG]
    if argv[:1] == ["--list"]:
        sys.exit(_one_line(lambda: _list(argv[1] if len(argv) > 1 else "models", argv[2:])))
    register_configs()
    if argv[:1] in (["--help"], ["-h"]) and not any(a.startswith(("-", "hydra")) for a in argv[1:]):
        sys.exit(_one_line(lambda: _help(argv[1:])))
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    sweep = "-m" in argv or "--multirun" in argv
    try:
        if argv != (resumed := _resume_argv(argv)):
            MEMO.resume = True
            _exit_if_complete(MEMO.resumed_from.parent.parent)
            sys.argv[1:] = argv = resumed
        _job()
    except Refused as refused:
        print(f"kdrun: error: {refused.args[0]}", file=sys.stderr)
        sys.exit(2 if isinstance(refused.args[0], InputError) else 1)  # kdrun.errors: the rule
    except Exception as exc:  # noqa: BLE001 - anything not explained is re-raised with its traceback
        _summarize_sweeps()
        message = None if user_wants_traceback else explain(exc, argv)
        if MEMO.refused and not user_wants_traceback:  # an unusable run dir: Hydra failed to create or log into it
            message = str(MEMO.refused[-1])
        _say_where(sys.stderr)
        if message is None:
            raise
        print(f"kdrun: error: {message}", file=sys.stderr)
        sys.exit(1 if space_message(exc) else 2)  # a full disk: not a config error (kdrun.errors: the rule)
    if MEMO.interrupted:
        _report_interrupted(sweep)
    failed_in_sweeps = _summarize_sweeps()
    _say_where(sys.stderr if failed_in_sweeps or MEMO.failed_jobs else sys.stdout)
    if failed_in_sweeps and not MEMO.failed_jobs:  # jobs of other processes (parallel launchers) failed
        print(f"kdrun: error: {failed_in_sweeps} sweep job(s) failed; see summary.md in the sweep dir",
              file=sys.stderr)
        sys.exit(1)
    if MEMO.failed_jobs:
        sweep = sweep or len(MEMO.failed_jobs) > 1
        for out_dir, exc in MEMO.failed_jobs:
            print(f"kdrun: error: {f'job {out_dir}: ' if sweep else ''}{exc}", file=sys.stderr)
        sys.exit(2 if all(isinstance(e, InputError) for _, e in MEMO.failed_jobs) else 1)  # kdrun.errors: the rule
