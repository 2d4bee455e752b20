"""``python -m suite_timer <llava_dsl.train flags>``: ``step_timer``, ending the process as soon as training ends.

The GPU suite times steps only; LLaVA's final save (``safe_save_model_for_hf_trainer``: a ZeRO-3 gather and a
multi-GB write of a random model) and DeepSpeed's teardown would add seconds of device time to every launch. The
step timings are written by ``step_timer``'s own ``on_train_end``, which runs first; this callback is added after
it, then flushes and exits with status 0. Nothing else about training changes.
"""
from __future__ import annotations

import os
import sys

from transformers import TrainerCallback


class ExitAfterTraining(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> None:
    import llava_dsl.train
    import step_timer

    run_training = llava_dsl.train.main

    def main_with_exit(argv):
        # step_timer.main has wrapped DSLTrainer.__init__ by now; wrapping it again puts this callback after its timer
        from llava_dsl.plugin import DSLTrainer

        timed_init = DSLTrainer.__init__

        def init(self, *args, **kwargs):
            timed_init(self, *args, **kwargs)
            self.add_callback(ExitAfterTraining())

        DSLTrainer.__init__ = init
        return run_training(argv)

    llava_dsl.train.main = main_with_exit
    step_timer.main()


if __name__ == "__main__":
    main()
