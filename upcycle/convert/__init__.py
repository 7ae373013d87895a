"""`upcycle convert`: source -> plan -> expert methods and router init -> streaming writer (pipeline.py drives it)."""
