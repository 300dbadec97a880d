"""``fedlora study``: which method gives the best global model for the same client cost?

A study file (``configs/study/study.toml``) names the tasks (one run config each), the
methods (one of them the reference that the others are rated against), the seeds, one
learning-rate grid and the ablations. The study then

1. sweeps the grid for every method on one task and a seed that is not reported
   (its own client split and held-out sample), and picks each method's rate the same
   way: best final accuracy (a generative task: lowest answer loss), ties to the smaller rate;
2. runs every method x seed on every task with those rates (``fedlora compare``);
3. runs each ablation's variants (its methods, every seed, each method at its swept rate);
4. writes the report (Markdown + plots) from the run directories alone.

Every run is an ordinary ``fedlora run`` directory; finished ones are skipped, so the
command resumes where it stopped. Runs go one at a time, or ``--jobs N`` at a time in worker
processes (:mod:`fedlora.run_pool`): the sweep first, then everything that needs its rates.

One job per module: ``spec`` (the study file), ``metric`` (what a task is ranked by), ``runner``
(the output layout and running what is missing), ``report`` (the Markdown: setup, sweeps, verdicts),
``task_report`` / ``lm_report`` (one classification / generative task's section, from the parts in
``section``), ``ablation_report`` (the ablations' tables), ``stats`` (paired differences, Holm,
power), ``plots`` (every figure, also ``fedlora compare``'s). Import from them; this package
re-exports nothing, so that ``fedlora.compare`` can use ``study.plots`` without importing the rest
of the study.
"""
