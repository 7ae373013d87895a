"""Verbs that read models and say things about them: verify (logit equality) and inspect (what a checkpoint holds)."""
