"""PyTorch mirror of ``gpt2.GPT2`` (same layer names, so the same PEFT ``target_modules``).

Kept in its own module so the torch benchmark child never imports JAX (and vice versa), which
keeps each child's peak RSS about its own framework.
"""

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5


class Attention(nn.Module):
    """Causal self-attention with separate ``query``/``key``/``value``/``out`` projections."""

    def __init__(self, d_model: int, heads: int, attention: str):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention == "none":  # the diagnostic of gpt2.GPT2Config.attention
            return self.out(self.value(x))
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Two-layer GELU (tanh approximation, as ``jax.nn.gelu``) MLP with ``up``/``down``."""

    def __init__(self, d_model: int, mlp: int):
        super().__init__()
        self.up = nn.Linear(d_model, mlp)
        self.down = nn.Linear(mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm decoder block."""

    def __init__(self, d_model: int, heads: int, mlp: int, attention: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.attn = Attention(d_model, heads, attention)
        self.ln2 = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.mlp = MLP(d_model, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT2(nn.Module):
    """GPT-2-style decoder; ``tokens`` of shape ``(batch, seq)`` -> logits ``(batch, seq, vocab)``.

    Args:
        vocab: Vocabulary size.
        d_model: Residual stream width.
        layers: Number of decoder blocks.
        heads: Attention heads.
        mlp: MLP hidden width.
        seq: Maximum sequence length.
        attention: ``"causal"``, or ``"none"`` (see ``gpt2.GPT2Config.attention``).
    """

    def __init__(
        self,
        vocab: int,
        d_model: int,
        layers: int,
        heads: int,
        mlp: int,
        seq: int,
        attention: str = "causal",
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp, attention) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
