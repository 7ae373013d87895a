"""`upcycle train`: continued pretraining of an upcycled MoE.

data.py (text -> packed, cached token blocks) -> loop.py (model + routing_hooks.py -> losses.py -> optim.py)
-> checkpoint.py (atomic step folders, exact resume, final/ in the native format) and metrics.py
(metrics.jsonl, TensorBoard, progress); distributed.py wraps the model for torchrun (FSDP2); spec.py holds
every option; memory.py estimates what a run needs before it starts.
"""
