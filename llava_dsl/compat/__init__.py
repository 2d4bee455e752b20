"""Fixes made on the way to other people's bugs (LLaVA, DeepSpeed, PEFT, bitsandbytes), each deletable when
upstream fixes it: ``lora`` (LLaVA #1647, quantization skip list), ``deepspeed`` (ZeRO-3 gathers and full shapes,
dtype casts, the no_sync guard, CPU launch and shared-memory clean-up), ``distributed`` (rank, barrier,
print-once, teardown)."""
