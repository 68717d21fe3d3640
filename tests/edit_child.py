"""A MEMIT edit of the tiny model in its own process, for the interrupted-run tests.

``python -m tests.edit_child <model dir> <cache dir> <pause point> <marker file>`` edits and
prints the sha256 of the edited model. With a pause point other than ``none`` it stops at that
point instead (writes the marker file and sleeps), so the test can kill it there:

- ``stats``: in the middle of the second-moment pass, nothing written yet;
- ``edit``: after the first v* optimisation, statistics already cached, edit not yet saved;
- ``cache-write``: the edit cache's weights file written to the temporary folder, not renamed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

EDIT_ARGS = {"method": "memit", "device": "cpu", "batch_size": 4, "forget_size": 3,
             "v_num_grad_steps": 3, "mom2_n_tokens": 3000, "mom2_max_length": 64, "layers": "[0]"}


def pause_at(point: str, marker: Path) -> None:
    def pause():
        marker.write_text(point)
        time.sleep(600)

    if point == "stats":
        import e2u_models.editing.stats as stats

        class PausingProgress(stats.tqdm):
            def update(self, n=1):
                super().update(n)
                if self.n > 1000:
                    pause()

        stats.tqdm = PausingProgress
    elif point == "edit":
        import e2u_models.editing.vstar as vstar

        real_loop = vstar._step_loop

        def loop_then_pause(*args, **kwargs):
            result = real_loop(*args, **kwargs)
            pause()
            return result

        vstar._step_loop = loop_then_pause
    elif point == "cache-write":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_then_pause(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if "edits" in str(filename):
                pause()

        safetensors.torch.save_file = save_then_pause
    elif point != "none":
        raise SystemExit(f"unknown pause point {point!r}")


def main(model_dir: str, cache_dir: str, point: str, marker: str) -> None:
    pause_at(point, Path(marker))
    from e2u_models.edit_cache import model_sha256
    from e2u_models.model import E2ULM

    lm = E2ULM(pretrained=model_dir, cache_dir=cache_dir, **EDIT_ARGS)
    print(model_sha256(lm.model))


if __name__ == "__main__":
    main(*sys.argv[1:5])
