"""An exported ponderlm run as a `transformers` model: `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`.

Copied next to config.json by `ponderlm export`. The forward is the run's own inference path (`Method.infer`) at
the exported tau, so the logits are ponderlm's; it needs the `ponderlm` package installed. `generate()` works
through transformers' GenerationMixin, without a KV cache (every step recomputes the whole prefix).
"""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_ponderlm import PonderLMConfig


class PonderLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PonderLMConfig
    base_model_prefix = "method"
    # A tied run's checkpoint holds the shared matrix once, under the embedding's name.
    _tied_weights_keys = {"method.backbone.lm_head.weight": "method.backbone.embed_tokens.weight"}

    def __init__(self, config: PonderLMConfig):
        super().__init__(config)
        from ponderlm.config import config_from_dict
        from ponderlm.methods import build_model

        self.method = build_model(config_from_dict(config.ponderlm))
        self.post_init()

    def _init_weights(self, module):
        pass  # the weights come from model.safetensors

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, labels=None, **kwargs):
        logits = self.method.infer(input_ids, self.config.tau)[0]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
