"""``python -m step_timer <llava_dsl.train flags>``: the plugin's entry point, with every optimizer step timed.

Used by ``train_throughput.py`` as the entry module (``TRAIN_MODULE=step_timer`` for the ZeRO-3 scripts, with
``scripts/bench`` on ``PYTHONPATH``). Nothing about training changes except one device synchronisation at the start
and end of every optimizer step, so each step's wall time is the time of its own work:

    STEP_TIMER_OUT=steps.json      per-step seconds ("step_s"), the time between steps ("between_s": the
                                   data-loader wait and the Trainer's bookkeeping), and allocator counters
    STEP_TIMER_PROFILE=10,5        also run torch.profiler over optimizer steps 10..14, write the top operators
                                   by device and by host time next to STEP_TIMER_OUT, and add the summed kernel
                                   time per step ("profiled_device_s_per_step") to it: the device's own work,
                                   free of the host-side noise that moves wall times between runs

Only the first rank writes.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from transformers import TrainerCallback


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    def __init__(self, out: str, profile: str = ""):
        self.out = out
        self.step_s, self.between_s = [], []
        self._began = self._ended = None
        self.profile_start, self.profile_count = (int(v) for v in profile.split(",")) if profile else (-1, 0)
        self._profiler = None
        self.profiled = {}

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._began = time.perf_counter()
        if self._ended is not None:
            self.between_s.append(self._began - self._ended)
        if state.global_step == self.profile_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self._profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self._ended = time.perf_counter()
        self.step_s.append(self._ended - self._began)
        if self._profiler is not None and state.global_step == self.profile_start + self.profile_count:
            self._profiler.__exit__(None, None, None)
            self._write_profile(self._profiler)
            self._profiler = None

    def on_train_end(self, args, state, control, **kwargs):
        if int(os.environ.get("RANK", "0")) != 0:
            return
        memory = {}
        if torch.cuda.is_available():
            stats = torch.cuda.memory_stats()
            memory = {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                      "num_alloc_retries": stats.get("num_alloc_retries", 0),
                      "num_device_alloc": stats.get("num_device_alloc", 0)}
        with open(self.out, "w") as f:
            json.dump({"step_s": self.step_s, "between_s": self.between_s, "memory": memory, **self.profiled}, f,
                      indent=1)

    def _write_profile(self, profiler) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        averages = profiler.key_averages()
        # Kernels are their own device-side events; the host operators that launched them also carry their time, so
        # only device events are summed (what the table's "Self CUDA time total" line counts), in microseconds.
        device_us = sum(e.self_device_time_total for e in averages
                        if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation)
        host_us = sum(e.self_cpu_time_total for e in averages)
        self.profiled = {"profiled_device_s_per_step": device_us / 1e6 / self.profile_count,
                         "profiled_host_s_per_step": host_us / 1e6 / self.profile_count}
        device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(os.path.splitext(self.out)[0] + ".profile.txt", "w") as f:
            f.write(f"optimizer steps {self.profile_start}..{self.profile_start + self.profile_count - 1}\n\n")
            f.write(f"by {device_key}\n{averages.table(sort_by=device_key, row_limit=40)}\n\n")
            f.write(f"by cpu_time_total\n{averages.table(sort_by='cpu_time_total', row_limit=40)}\n")


def main() -> None:
    out = os.environ.get("STEP_TIMER_OUT")
    if not out:
        raise SystemExit("step_timer: set STEP_TIMER_OUT to the json file the step times go to")
    import llava_dsl.train
    from llava_dsl.plugin import DSLTrainer

    original_init = DSLTrainer.__init__

    def init_with_timer(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(StepTimer(out, os.environ.get("STEP_TIMER_PROFILE", "")))

    DSLTrainer.__init__ = init_with_timer
    llava_dsl.train.main(sys.argv[1:])


if __name__ == "__main__":
    main()
