"""bandgate's benchmark suite: how fast, how fair, against what, measured side by side in one run.

Entry point: ``python -m bench [SCENARIO ...] [--quick] [--out DIR]`` (see ``bench/README.md``).
Every headline figure is a ratio against a baseline measured in the same run (a raw echo over the
same transport, an in-process gate, a Redis gate, GIE's design bound), because absolute times
vary from machine to machine.

Modules: ``_harness`` (statistics, tables, JSON), ``_procs`` (every child process, always
stopped), ``_loadgen`` (load generator processes), ``_echo`` / ``_inproc`` / ``_redisgate``
(the baselines and peers), and one module per scenario.
"""
