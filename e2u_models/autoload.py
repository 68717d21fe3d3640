"""Start-up hook that makes the stock ``lm_eval`` CLI know ``--model e2u`` and the e2u tasks.

lm-eval 0.4.13 has no plugin discovery, so the wheel ships ``e2u.pth`` (and ``e2u.start`` for
Python >= 3.15, PEP 829) which call :func:`install` at interpreter start. ``install`` only puts a
meta-path finder in place: nothing happens until lm-eval itself is imported, and then only:

- after ``lm_eval.models`` runs (so the built-in models are registered first and ``--model hf``
  keeps working), the alias ``e2u`` is registered as a lazy ``"module:Class"`` placeholder
  (torch/transformers load only when ``--model e2u`` is used); model classes without
  ``e2u_answer`` (the e2u tasks' request type) get a method that says in one line that e2u tasks need ``--model e2u``; and, in
  the ``lm_eval`` console script only, e2u's own errors print as one line instead of a traceback;
- after ``lm_eval.tasks.manager`` runs, ``TaskManager`` gets e2u's task folder as its first
  ``include_path`` entry (built-ins < e2u < the user's ``--include_path``); when an ``lm_eval``
  command's ``--tasks`` names only e2u tasks, lm-eval skips indexing its built-in tasks.

It never prints or raises at start-up (also when lm-eval, torch or transformers are missing or
broken): a failing callback prints one line to stderr and leaves lm-eval as it was. Set
``E2U_DISABLE_AUTOLOAD=1`` to switch it off; ``e2u-lm-eval`` works either way.

In the lm-eval CLI only, :mod:`e2u_models.terminal` makes what lm-eval prints true for e2u's tasks
(the batch size used, no warnings that do not apply, ``composite`` rows on groups only).

Import-light on purpose (``os`` and ``sys`` only; ``logging`` in the CLI): it runs in every
interpreter of the environment.
"""

import os
import sys

DISABLE_ENV = "E2U_DISABLE_AUTOLOAD"
MODEL_ALIAS = "e2u"
MODEL_TARGET = "e2u_models.model:E2ULM"
TASKS_PACKAGE = "task_configs"
_MARK = "_e2u_hooked"


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def install(force: bool = False) -> None:
    """Install the post-import hook (idempotent). ``force`` ignores the opt-out variable."""
    try:
        if _disabled() and not force:
            return
        if not any(getattr(f, _MARK, False) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())
        if _running_the_cli():
            _prepare_the_cli()
        # Modules imported before the hook was installed get their callback now.
        for name, callback in _CALLBACKS.items():
            module = sys.modules.get(name)
            if module is not None:
                _run_callback(callback, module)
    except Exception as exc:  # never break the interpreter
        _warn(exc)


def running_the_cli(argv, orig_argv) -> bool:
    """Whether this interpreter runs lm-eval's command line (console script or ``python -m``).
    Checked at every interpreter start, so it only reads ``argv``."""
    program = argv[0] if argv else ""
    if os.path.basename(program) in CLI_NAMES:
        return True
    if program == "-m" and "-m" in orig_argv:  # at start-up ``python -m x`` shows argv[0] == "-m"
        index = list(orig_argv).index("-m")
        return index + 1 < len(orig_argv) and orig_argv[index + 1] in CLI_MODULES
    return program.replace("\\", "/").endswith(("lm_eval/__main__.py", "e2u_models/cli.py"))


def _running_the_cli() -> bool:
    return running_the_cli(sys.argv or [""], getattr(sys, "orig_argv", []))


def _prepare_the_cli() -> None:
    """e2u's default batch size on the command line, lm-eval's warnings that do not apply to e2u's
    tasks dropped (see :mod:`e2u_models.terminal`)."""
    from e2u_models import terminal

    args = terminal.with_default_batch_size(sys.argv[1:])
    if args is not None:
        sys.argv[1:] = args
    folder = tasks_dir()
    if folder is not None:
        terminal.install_warning_filter(e2u_task_names(folder))


def _after_utils(module) -> None:
    """In the CLI, the printed table shows ``composite`` on groups only."""
    from e2u_models import terminal

    folder = tasks_dir()
    table = getattr(module, "make_table", None)
    if folder is None or table is None or getattr(table, _MARK, False) or not _running_the_cli():
        return
    module.make_table = terminal.without_composite_parts(table, e2u_task_names(folder))


def tasks_dir():
    """Folder holding e2u's task YAMLs, found without importing anything heavy."""
    import importlib.util

    spec = importlib.util.find_spec(TASKS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _warn(exc: BaseException) -> None:
    try:
        sys.stderr.write(f"e2u: start-up hook skipped ({type(exc).__name__}: {exc}); "
                         f"use e2u-lm-eval or set {DISABLE_ENV}=1\n")
    except Exception:
        pass


def _run_callback(callback, module) -> None:
    try:
        callback(module)
    except Exception as exc:
        _warn(exc)


class _PostImportFinder:
    """Meta-path finder that reacts to exactly the modules in ``_CALLBACKS``."""

    _e2u_hooked = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _CALLBACKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module
        callback = _CALLBACKS[fullname]

        def exec_module(module):
            original(module)
            _run_callback(callback, module)

        # The loader object belongs to this one module, so wrapping its method is local.
        loader.exec_module = exec_module
        return spec


def _after_models(module) -> None:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry

    if MODEL_ALIAS not in model_registry:
        model_registry.register(MODEL_ALIAS, target=MODEL_TARGET)
    if not hasattr(LM, "e2u_answer"):
        LM.e2u_answer = _e2u_answer_unsupported
    if os.path.basename(sys.argv[0] if sys.argv else "") in CLI_NAMES[:2]:
        install_one_line_errors()


def _e2u_answer_unsupported(self, requests, disable_tqdm=False):
    from e2u_tasks.errors import E2UError

    raise E2UError(
        f"the e2u forget/retain tasks (tofu_*, pistol_*, facts_*, e2u_forget/_retain/_rephrase) "
        f"need per-token ranks, which only --model e2u "
        f"serves; {type(self).__name__} cannot run them. For a baseline use "
        "--model e2u --model_args pretrained=<model>,method=none"
    )


def install_one_line_errors() -> None:
    """Print e2u's user errors (``E2UError``) as one line; everything else as before."""
    previous = sys.excepthook
    if getattr(previous, _MARK, False):
        return

    def hook(exc_type, exc, tb):
        if any(cls.__name__ == "E2UError" for cls in getattr(exc_type, "__mro__", ())):
            sys.stderr.write(f"e2u: error: {exc}\n")
            return
        previous(exc_type, exc, tb)

    hook._e2u_hooked = True
    sys.excepthook = hook


def _after_task_manager(module) -> None:
    manager_cls = getattr(module, "TaskManager", None)
    if manager_cls is None or hasattr(module, "discover_plugin_task_paths"):
        return  # a newer lm-eval finds plugin tasks itself through our entry point
    original = manager_cls.__init__
    if getattr(original, _MARK, False):
        return
    import functools
    import inspect

    signature = inspect.signature(original)
    folder = tasks_dir()
    if folder is None:
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments.get("include_path")
        paths = [] if given is None else ([given] if isinstance(given, (str, os.PathLike)) else list(given))
        if not any(os.path.abspath(str(p)) == os.path.abspath(folder) for p in paths):
            bound.arguments["include_path"] = [folder, *paths]
        if bound.arguments.get("include_defaults", True) is True and _cli_asks_only_e2u_tasks(folder):
            # lm-eval indexes its ~10k built-in task files (~15-20 s) on every run; a command
            # that names only e2u tasks does not need them.
            bound.arguments["include_defaults"] = False
        original(*bound.args, **bound.kwargs)

    __init__._e2u_hooked = True
    manager_cls.__init__ = __init__


CLI_NAMES = ("lm_eval", "lm-eval", "e2u-lm-eval")
CLI_MODULES = ("lm_eval", "e2u_models.cli")  # python -m ...


def e2u_task_names(folder) -> set:
    """Task, group and tag names e2u defines: each YAML is named after what it defines."""
    names = {n[:-5] for n in os.listdir(folder) if n.endswith(".yaml") and not n.startswith("_")}
    return names | {"e2u_all"}


def _cli_asks_only_e2u_tasks(folder) -> bool:
    argv = sys.argv if sys.argv else [""]
    if os.path.basename(argv[0]) not in CLI_NAMES:
        return False
    values = []  # --tasks takes comma- and/or space-separated names
    args = argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith("--tasks="):
            values.append(arg.split("=", 1)[1])
        elif arg in ("--tasks", "-t"):
            for value in args[i + 1:]:
                if value.startswith("-"):
                    break
                values.append(value)
    names = {n.strip() for v in values for n in v.split(",") if n.strip()}
    return bool(names) and names <= e2u_task_names(folder)


_CALLBACKS = {
    "lm_eval.models": _after_models,
    "lm_eval.utils": _after_utils,
    "lm_eval.tasks.manager": _after_task_manager,
}
