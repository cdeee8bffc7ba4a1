"""The course: what notebooks and exercises call.

Owns notebook parameters, results files and the GPU reference (`notebook`), the set-up check
(`setup_check`, `info`), the serving experiments of notebooks 03–07 (`experiments`), notebook
07's Kubernetes choices (`deployment`), notebook 08's continuous batching experiment with its
own table and findings (`continuous_batching`), notebook 09's cost frontier of every server
set-up with its tables and findings (`cost_frontier`), the conclusions printed at the end of
notebooks (`findings`), answer checkers (`answers`), the exercise builder (`exercises`), the
notebook runner (`nbrun`) and the learner's workspace that `make lab` opens (`workspace`).

May import: every other labkit package. Nothing imports it.
"""
