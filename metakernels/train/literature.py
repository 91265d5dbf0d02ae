"""What the literature says about MAML on sinusoid regression, and how sure we are of it.

Verified (read from the MAML authors' released code, github.com/cbfinn/maml, main.py at commit a7f45f1 and
data_generator.py at commit 617ba8a):
  * tasks: amplitude U[0.1, 5.0], phase U[0, pi], x U[-5, 5], y = A sin(x - phase);
  * each task draws 2K points: the first K are the support set, the last K the query set (K = 10 in the usage
    line for 10-shot sinusoid), so the query set also has K points;
  * training: 70,000 meta-iterations in the usage line, meta-batch 25, Adam meta-lr 0.001, 1 inner step;
  * testing: 600 tasks (NUM_TEST_POINTS), one at a time, MSE after 0..10 inner steps, reported as the mean,
    np.std (ddof 0) and ci95 = 1.96 * std / sqrt(600) -- the statistic metakernels reports too;
  * caveat: in that code the inner step size flag update_lr defaults to 1e-3 and the 10-shot sinusoid usage
    line does not override it, while the inner lr of 0.01 used here follows the paper's text (the paper's
    text itself could not be retrieved with the tools available to this job).

Not verified: published MSE values. MAML's paper shows the sinusoid results only as curves (Figure 3, MSE vs
number of gradient steps for K = 5, 10, 20), and Meta-SGD (Li et al. 2017, arXiv:1707.09835) tabulates MAML
and Meta-SGD one-step MSE for 5/10/20-shot training (Table 1). Neither the figure's values nor the table could
be retrieved and checked here, so no number is quoted: compare against the papers themselves.
"""

from __future__ import annotations

from typing import Any

REFERENCES: list[dict[str, Any]] = [
    {
        "source": "Finn, Abbeel & Levine 2017, Model-Agnostic Meta-Learning (arXiv:1703.03400), sec. 5.1, Fig. 3",
        "protocol": {
            "verified_from": "github.com/cbfinn/maml main.py @a7f45f1, data_generator.py @617ba8a",
            "amplitude": [0.1, 5.0],
            "phase": [0.0, "pi"],
            "x": [-5.0, 5.0],
            "k_support": 10,
            "k_query": 10,
            "meta_batch": 25,
            "meta_lr": 0.001,
            "inner_steps_train": 1,
            "iterations": 70000,
            "test_tasks": 600,
            "test_steps": "0..10",
            "ci95": "1.96 * np.std(ddof=0) / sqrt(600)",
            "note": "update_lr defaults to 1e-3 in the code's flags and the sinusoid usage line keeps it; "
                    "the paper states alpha = 0.01 (not re-checked here)",
        },
        "mse": None,
        "mse_status": "not verified: results are shown as curves only (Fig. 3); values not retrievable here",
    },
    {
        "source": "Li, Zhou, Chen & Li 2017, Meta-SGD (arXiv:1707.09835), Table 1 (MAML and Meta-SGD, 1 step)",
        "protocol": {"note": "one-step adaptation, 5/10/20-shot; the exact test protocol could not be checked"},
        "mse": None,
        "mse_status": "not verified: the table could not be retrieved with the available tools; no value quoted",
    },
]


def literature_summary() -> list[dict[str, Any]]:
    """The references above, for metrics.json (a copy: callers may modify it)."""
    import copy

    return copy.deepcopy(REFERENCES)
