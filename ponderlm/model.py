"""The LLaMA-style decoder every method shares (docs/design.md §2).

Read top to bottom: RMSNorm, rotary embeddings, attention (with an optional additive per-key bias and a KV
cache), SwiGLU MLP, the block, the stack. The backbone maps input *embeddings* to final-norm hidden states, so
methods that feed hidden states back as inputs (latent thoughts) use the same code path as plain tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ponderlm.schema import ModelConfig

HARD_MASK = -1e9  # the key bias of a slot no query may see: finite, so nothing turns into NaN


def init_std(hidden_size: int) -> float:
    """The std every weight starts from, sqrt(2 / 5d) (docs/design.md §2): the backbone's and a method's own."""
    return math.sqrt(2.0 / (5 * hidden_size))


def init_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at two standard deviations, in place."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision at large d.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (..., S, head_dim) for integer positions (..., S); slots may share a position."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.flex = config.attention_backend == "flex"
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.resolved_key_value_heads()
        self.head_dim = config.hidden_size // self.num_heads
        # Rows: the queries of every head, then the keys, then the values of every key/value head.
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                  bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, layer: int,
                bias_column: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((self.num_heads * self.head_dim, kv_width, kv_width), dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # rotate in the activation dtype: no bf16 -> fp32 round trip
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # a view of the engine's cache writes the new keys and attends (ponderlm/kvcache.py)
            return self.o_proj(cache.attend(layer, q, k, v).transpose(1, 2).reshape(batch, seq, -1))
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: each key/value head serves a group
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        if bias_column is not None and self.flex and q.is_cuda:
            out = flex_biased_causal_attention(q, k, v, bias_column[:, 0, :, 0] / self.head_dim ** 0.5)
        elif bias_column is not None:
            out = biased_causal_attention(q, k, v, bias_column)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def biased_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bias_column: torch.Tensor) -> torch.Tensor:
    """Causal attention plus a per-key bias, through the fused `is_causal` kernel (the "augmented matrix").

    Each query gets an extra component 1 and each key the component bias / scale, so the scaled q.k of the
    kernel already contains the bias; values get a 0. The bias receives gradients through k, and no float mask
    (which would force SDPA onto a slow path when it requires grad) is ever built.
    bias_column: (B, 1, S, 1), the per-key bias already divided by the softmax scale.
    """
    batch, heads, seq, head_dim = q.shape
    pad = 8 - head_dim % 8  # keep the padded head dim a multiple of 8 for the kernels
    zeros = q.new_zeros(batch, heads, seq, pad - 1)
    q_aug = torch.cat((q, q.new_ones(batch, heads, seq, 1), zeros), dim=-1)
    k_aug = torch.cat((k, bias_column.to(k.dtype).expand(batch, heads, seq, 1), zeros), dim=-1)
    v_aug = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, is_causal=True, scale=head_dim ** -0.5)
    return out[..., :head_dim]


_compiled_flex = None


def flex_biased_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 key_bias: torch.Tensor) -> torch.Tensor:
    """The same as biased_causal_attention through flex_attention: causal block mask plus a score_mod bias."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    seq = q.shape[2]
    causal = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq, seq, device=q.device)
    bias = key_bias.to(q.dtype)
    return _compiled_flex(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[b, kv_idx],
                          block_mask=causal)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inner = config.resolved_intermediate_size()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inner, bias=False)
        self.down_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, layer, bias_column=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, bias_column)
        return x + self.mlp(self.post_attention_layernorm(x))


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight^T, target_i), never holding the (N, V) logits or their gradient at once.

    Rows go through in chunks; each chunk's gradients (softmax - onehot) @ weight and its share of weight's
    gradient are computed in the forward while its logits are at hand, so the backward only scales them. Same
    matmuls as lm_head + F.cross_entropy, without the fp32 log-softmax and its backward over the full logits
    (benchmarks/train_throughput.py). Under autocast the matmuls run in its dtype and the softmax in fp32, as before.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int
                ) -> torch.Tensor:
        rows = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for start in range(0, rows, chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = F.linear(h, weight)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            log_z = logits.logsumexp(-1)
            total += (log_z - logits.gather(1, t[:, None])[:, 0]).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = logits.sub_(log_z[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            grad = grad.div_(rows).to(torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(
                h.device.type) else h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = grad @ weight.to(grad.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h.to(grad.dtype)).to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / rows

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T (hidden (..., d), targets (...)), chunked and fused."""
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_rows)


class Transformer(nn.Module):
    """Embedding, `num_hidden_layers` blocks, final RMSNorm and `lm_head` (untied unless tie_word_embeddings)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it comes from the tokenizer)")
        self.config = config
        d = config.hidden_size
        # reset_parameters initialises every weight. Embedding's own normal_ is skipped on the meta device (its meta
        # version imports torch._dynamo, a second of every model_skeleton) and kept elsewhere, only so that a seed
        # still gives the initial weights it gave before (runs of a sweep started earlier stay comparable).
        embedding = torch.empty(config.vocab_size, d)
        if not embedding.is_meta:
            nn.init.normal_(embedding)
        self.embed_tokens = nn.Embedding(config.vocab_size, d, _weight=embedding)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # sqrt(2.5 d) turns the init std sqrt(2 / 5d) into unit-scale token inputs (docs/design.md §2, every method).
        self.embed_scale = math.sqrt(2.5 * d) if config.embedding_scale else 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = init_std(self.config.hidden_size)
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if module is self.lm_head and self.config.tie_word_embeddings:
                continue  # the embedding matrix, initialised once
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = residual_std if name.endswith(("o_proj", "down_proj")) else std
                init_normal_(module.weight, s)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def hidden_states(self, inputs_embeds: torch.Tensor, positions: torch.Tensor | None = None,
                      key_bias: torch.Tensor | None = None, cache=None, repeats: int = 1, cache_pass: int = 0,
                      final_norm: bool = True, slot_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, S, d) for input embeddings (B, S, d), causal over the S slots.

        positions: RoPE positions (S,) or (B, S); default 0..S-1.
        key_bias: additive attention bias per key (B, S), added for every query, layer and head (training path).
        cache: a view of the inference engine's KV cache (`ponderlm/kvcache.py`), which stores the new keys and
            holds the earlier ones with their own biases.
        repeats: apply the whole layer stack this many times with shared weights (`loop`); final norm once.
        cache_pass: which pass of a multi-pass method this call's first repeat is (its keys' cache group).
        final_norm: False returns the residual stream itself, for methods that continue it in a later call.
        slot_mask: (B, S) which slots are real, for a prefill view (others are padding and never cached).
        """
        seq = inputs_embeds.shape[1]
        if positions is None:
            positions = torch.arange(seq, device=inputs_embeds.device)
        if cache is not None:
            cache.begin(positions, slot_mask)
        cos, sin = rotary_tables(positions, self.config.hidden_size // self.config.num_attention_heads,
                                 self.config.rope_theta)
        if cos.dim() == 3:  # per-sequence positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        bias_column = None
        if key_bias is not None:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            bias_column = (key_bias * head_dim ** 0.5)[:, None, :, None]
        x = inputs_embeds
        layers = len(self.layers)
        for repeat in range(repeats):
            for index, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache, (cache_pass + repeat) * layers + index, bias_column)
        return self.norm(x) if final_norm else x

    def num_matmul_params(self) -> int:
        """Weights of the blocks' Linear layers: the N_nonembedding of the FLOPs counter (docs/design.md §5)."""
        return sum(m.weight.numel() for m in self.layers.modules() if isinstance(m, nn.Linear))
