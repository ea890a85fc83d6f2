"""What a job will cost before it starts: tokens per stage, seconds on this machine, and a warning on a CPU.

    machine = Machine.measure()                                  # a short matmul: this device's FLOP/s
    plan = restore_estimate(model_config, restore, prune, calibration, machine, samples=samples)
    plan.log()                                                   # one line per stage, and the total
    plan.warn_if_long(QUICK_HINT)                                # on a CPU, above 15 minutes
    progress.follow(plan.stages_seconds())                       # bars and stage lines show time left

A stage's seconds = its FLOPs / (the measured matmul rate x an efficiency for that kind of work) + the
compile seconds of its programs. FLOPs come from the model's shapes (2 per weight per token, plus
attention over the context) and the tokens the stage runs: counted from the data's characters
(`CHARS_PER_TOKEN`) and padded the way the stage batches them. The efficiencies and compile times were
fitted to measured SmolLM2-135M runs on a 2-core CPU (README, "On a CPU"); on an accelerator they are
rougher, and the progress bars correct the rest from each stage's measured step time
(`lcc_jax.progress.Plan`); a job resumed in a new process starts from what its earlier processes measured
(`calibrated`, from the job folder's eta.json).
"""

from __future__ import annotations

from lcc_jax.estimate.costs import (  # noqa: F401
    CHARS_PER_TOKEN,
    COMPILE_SECONDS,
    CPU_WARN_SECONDS,
    EFFICIENCY,
    LOAD_BYTES_PER_SECOND,
    REMAT_FLOPS,
    SAVE_BYTES_PER_SECOND,
    TRAIN_COMPILE,
    TRAIN_FLOPS,
    WIKITEXT2_TEST_CHARS,
    Costs,
    Estimate,
    Machine,
    StageEstimate,
)
from lcc_jax.estimate.follow import (  # noqa: F401
    calibrated,
    follow_evaluation,
    follow_recovery,
    follow_restore_job,
    quick_flags,
    report,
    reported_if_stopped,
    source_config,
)
from lcc_jax.estimate.jobs import (  # noqa: F401
    STAGE_FILES,
    done_stages,
    evaluate_estimate,
    recovery_estimate,
    restore_estimate,
)
from lcc_jax.estimate.tokens import (  # noqa: F401
    capture_shapes,
    packed_train_shapes,
    perplexity_shapes,
    text_tokens,
    wikitext2_tokens,
    zeroshot_shapes,
)
