"""``e2u-lm-eval``: lm-eval's own CLI with e2u registered explicitly.

Same flags as ``lm_eval``; works when the start-up hook is disabled (``E2U_DISABLE_AUTOLOAD=1``,
``python -S`` / ``-I``) and prints e2u's user errors as one line. ``e2u-lm-eval --tasks-dir``
prints the folder of e2u's task YAMLs (for ``--include_path`` in other setups).
"""

from __future__ import annotations

import sys


def main() -> None:
    from e2u_models import autoload

    if sys.argv[1:] == ["--tasks-dir"]:
        print(autoload.tasks_dir())
        return
    autoload.install(force=True)
    autoload.install_one_line_errors()
    import lm_eval.models  # noqa: F401  (fires the registration callbacks)
    import lm_eval.tasks.manager  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
