"""The lab layer: tools that run and report experiments on top of the core package.

``benchmark`` (a grid of teachers and students, run in a process pool, one JSON line per run),
``bench_grid`` (the grid and its results file), ``bench_table`` (its records as a table, with the paired statistics), ``bench_report`` (the markdown report of a benchmark) and ``bench_plots`` (its PNG plots),
``sweep`` (W&B sweeps and their offline runner), ``report`` (tables and plots of finished runs),
``stats`` (paired bootstrap and convergence checks), ``teacher_slices`` (a teacher scored on a student's
test slices), ``bank_inspect`` (what a prototype bank holds). Modules here import the core
(``lightning_distill.*`` outside ``lab``) through its public names only; the core never imports the lab
(``tests/test_layout.py`` checks both).
"""
