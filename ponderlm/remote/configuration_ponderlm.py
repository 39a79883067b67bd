"""The config of an exported ponderlm run, for `AutoConfig.from_pretrained(..., trust_remote_code=True)`.

Copied next to config.json by `ponderlm export`; `ponderlm` holds the run's whole config, `tau` the pruning threshold
the forward runs at.
"""

from transformers import PretrainedConfig


class PonderLMConfig(PretrainedConfig):
    model_type = "ponderlm"

    def __init__(self, ponderlm: dict | None = None, tau: float | None = None, **kwargs):
        self.ponderlm = ponderlm or {}
        self.tau = tau
        model = self.ponderlm.get("model", {})
        # Read by transformers' generation set-up; the forward itself recomputes the prefix and uses no cache.
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            kwargs.setdefault(key, model.get(key))
        # transformers ties lm_head to the embedding on loading only if the config says so (the file stores it once)
        kwargs.setdefault("tie_word_embeddings", bool(model.get("tie_word_embeddings", False)))
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)
