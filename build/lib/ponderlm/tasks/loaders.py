"""Document loaders for the task YAMLs in this folder (`custom_dataset: !function loaders.TASK`).

lm-eval calls them with the task's metadata as keyword arguments; `cache_dir` among them selects the download
cache (default: $PONDERLM_CACHE or ~/.cache/ponderlm), the rest is ignored.
"""

from ponderlm.downstream import task_docs


def _loader(task):
    def load(cache_dir=None, **_):
        return task_docs(task, cache_dir)
    return load


lambada = _loader("lambada")
arc_easy = _loader("arc_easy")
arc_challenge = _loader("arc_challenge")
hellaswag = _loader("hellaswag")
piqa = _loader("piqa")
winogrande = _loader("winogrande")
sciq = _loader("sciq")
