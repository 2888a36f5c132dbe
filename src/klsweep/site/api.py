"""The Python API reference: one page per part of the library that users import or extend,
each a list of modules that mkdocstrings renders from their docstrings and signatures."""

from __future__ import annotations

# page path under reference/api/ -> (title, what the modules are for, the modules)
API_PAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "kl.md": ("The KL math: klsweep.kl",
              "Estimators, β schedules and divergences as pure functions and small classes, "
              "usable in any trainer (DESIGN §10).",
              ("klsweep.kl.estimators", "klsweep.kl.schedules", "klsweep.kl.divergences",
               "klsweep.kl.f_terms", "klsweep.kl.forms")),
    "exact.md": ("The exact optimum",
                 "Closed forms of the exact task: the optimum π*, the reward–KL frontier, "
                 "best-of-n, and every divergence's optimum.",
                 ("klsweep.exact_math", "klsweep.exact_divergence")),
    "extending.md": ("Interfaces to extend",
                     "What a new task, algorithm, rollout engine or model implements; the "
                     "policy pair the algorithms see.",
                     ("klsweep.tasks.base", "klsweep.algos.common", "klsweep.engines.base",
                      "klsweep.models.base", "klsweep.policy")),
    "config-and-metrics.md": ("Configuration and metrics",
                              "The typed config fields that validate a run and feed --help, "
                              "and the registry every logged name is declared in.",
                              ("klsweep.schema", "klsweep.config", "klsweep.metrics")),
}


def api_page(path: str) -> str:
    """One page of the Python API reference, as Markdown with mkdocstrings' directives."""
    title, intro, modules = API_PAGES[path]
    lines = [f"# {title}", "", intro, ""]
    for module in modules:
        lines += [f"::: {module}", ""]
    return "\n".join(lines)
