"""`upcycle train`: continued pretraining of an upcycled MoE.

loop.py          train(): setup, then the loop over steps (log / evaluate / save), then the export
setup.py         the refusals, the data, the model, the optimizer and a resumed run's state -> Run
plan.py          TrainPlan: what the run is (--dry-run prints it) and its memory plan (memory.py estimates it)
model.py         which MoE, loading it in float32, the compute dtype, the RouterTap (routing_hooks.py)
step.py          one optimizer step: micro-batches -> forward -> named loss terms (losses.py) -> backward -> AdamW
evaluate.py      the held-out loss and expert load
export.py        final/ with its training record, load.png, the summary
data.py          text -> packed, cached token blocks; sampler.py: which blocks each rank reads at each step
checkpoint.py    atomic step folders, exact resume, final/ in the native format
metrics.py       metrics.jsonl, TensorBoard, progress;  optim.py: freezing, AdamW groups, the lr schedule
distributed.py   torchrun and FSDP2;  spec.py: every option
"""
