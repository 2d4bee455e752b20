"""Nothing lost: resumable checkpoints in every stage, atomic saves, and no sample dropped silently.

Three ways a LLaVA run loses work, and what this module does about each:

* **Resume.** A checkpoint holds the full trainer state in every stage (upstream's stage-1 checkpoints hold only
  ``mm_projector.bin``), is written under a temporary name and renamed, and gets a completion marker
  (``checkpoint_complete.json``: step, world size, every file with its size) as its last file. A restart with the
  same command resumes from the newest *complete* checkpoint; interrupted ones are moved to
  ``OUTPUT_DIR/incomplete-checkpoints/`` with a message. Older checkpoints are rotated away only after the new
  one is complete.
* **Atomic files.** ``mm_projector.bin``, the final model folder's files and ``trainer_state.json`` are written
  to a temporary name and renamed, so a crash leaves the previous good file or nothing, never a truncated one.
* **Data.** A sample whose labels are all masked (LLaVA's ``tokenization mismatch ... (ignored)``) is counted
  across ranks and dataloader workers and reported at every logging step; the run stops once more than
  ``--max_masked_sample_fraction`` of its samples are masked (default 0: at the first one). Malformed records
  and missing or unreadable images raise an error naming the sample id, the json file and the image, or, with
  ``--skip_bad_samples True``, are skipped and listed in ``OUTPUT_DIR/skipped_samples.jsonl``.

The trainer behaviour is ``SafetyTrainerMixin`` (a base class of the plugin's trainer); the data side swaps the
``llava`` names listed in ``PATCHES``, applied by ``llava_dsl.register()`` (``plugin.ALL_PATCHES``).
"""
