"""Inference engines our outputs are checked in (test tools, never dependencies): llama.cpp."""
