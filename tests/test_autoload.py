"""The start-up hook: silent at start-up whatever is broken, lazy, and switchable off."""

import os
import subprocess
import sys

import pytest

PROBE = ("import lm_eval.models; from lm_eval.api.registry import model_registry as r; "
         "print('e2u' in r, 'hf' in r)")


def python(code, env_extra=None, pythonpath=None):
    env = {**os.environ, **(env_extra or {})}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_plain_interpreter_start_prints_nothing_and_imports_nothing_heavy():
    proc = python("import sys; print(sorted(m for m in ('torch', 'transformers', 'lm_eval', "
                  "'e2u_tasks') if m in sys.modules))")
    assert proc.stdout.strip() == "[]" and proc.stderr == ""


@pytest.mark.parametrize("how", ["raises", "absent"])
@pytest.mark.parametrize("broken", ["lm_eval", "torch", "transformers"])
def test_silent_when_a_dependency_is_missing_or_raises(tmp_path, broken, how):
    error = ("RuntimeError('broken on purpose')" if how == "raises"
             else f"ModuleNotFoundError(\"No module named '{broken}'\", name='{broken}')")
    (tmp_path / broken).mkdir()
    (tmp_path / broken / "__init__.py").write_text(f"raise {error}\n")
    proc = python("pass", pythonpath=tmp_path)
    assert proc.stdout == "" and proc.stderr == ""


def test_registers_e2u_after_the_builtins():
    proc = python(PROBE)
    assert proc.stdout.split() == ["True", "True"], proc.stderr


def test_disabled_by_environment_variable():
    proc = python(PROBE, env_extra={"E2U_DISABLE_AUTOLOAD": "1"})
    assert proc.stdout.split() == ["False", "True"], proc.stderr


def test_task_manager_gets_e2u_tasks_first_and_user_paths_last(tmp_path):
    proc = python("from lm_eval.tasks import TaskManager; tm = TaskManager(include_path=%r); "
                  "print('tofu_forget' in tm.all_tasks, 'pistol' in tm.all_groups)" % str(tmp_path))
    assert proc.stdout.split() == ["True", "True"], proc.stderr


def test_yaml_file_names_are_the_names_they_define():
    """The start-up hook recognises e2u task names by file name: keep the two equal."""
    from pathlib import Path

    import yaml

    from e2u_models.autoload import e2u_task_names, tasks_dir

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    for path in Path(tasks_dir()).glob("[!_]*.yaml"):
        config = yaml.load(path.read_text(), Loader=Loader)
        assert path.stem == (config.get("group") or config.get("task"))
    assert {"tofu_factual", "pistol", "tofu_forget", "e2u_custom"} <= e2u_task_names(tasks_dir())


@pytest.mark.parametrize("argv,only_e2u", [
    (["lm_eval", "--model", "e2u", "--tasks", "tofu_factual,pistol_forget"], True),
    (["lm_eval", "--tasks=tofu_factual"], True),
    (["lm_eval", "run", "-t", "tofu_forget", "pistol", "--limit", "2"], True),
    (["lm_eval", "--tasks", "tofu_forget", "hellaswag"], False),
    (["lm_eval", "--tasks", "tofu_forget,hellaswag"], False),
    (["lm_eval", "ls", "tasks"], False),
    (["python", "--tasks", "tofu_forget"], False),
])
def test_builtin_index_is_skipped_only_for_e2u_only_commands(monkeypatch, argv, only_e2u):
    from e2u_models import autoload

    monkeypatch.setattr(sys, "argv", argv)
    assert autoload._cli_asks_only_e2u_tasks(autoload.tasks_dir()) is only_e2u
