"""Test hooks for the processes the tests start, loaded by Python at start-up when this
folder is on their PYTHONPATH: the product's own code paths carry none.

CLIP_TEST_CRASH_AFTER_EPOCH=N: once epoch N of a training run is saved, rank 0 kills itself
with SIGKILL, as a crashed machine would (tests/test_distributed.py resumes such a run).
"""

import os

if os.environ.get("CLIP_TEST_CRASH_AFTER_EPOCH"):
    import signal

    from clip_utils.model import training
    from clip_utils.runtime import distributed

    _AFTER = int(os.environ["CLIP_TEST_CRASH_AFTER_EPOCH"])
    _fit = training.fit

    def _crash(epoch: int, entry: dict) -> None:
        if epoch == _AFTER and distributed.is_main():
            os.kill(os.getpid(), signal.SIGKILL)

    def _fit_that_crashes(job, cfg, *, resume=False, callbacks=()):
        return _fit(job, cfg, resume=resume, callbacks=[*callbacks, _crash])

    # before any method imports `fit` by name
    training.fit = _fit_that_crashes
