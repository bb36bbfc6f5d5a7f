#!/usr/bin/env python3
"""PyTorch eager peer of `cargo bench -p moekit-benches --bench model`: the same model shape
(moekit-model's default config: vocab 16, d_model 128, 4 blocks of which the first dense with a
SwiGLU of 256, 4 heads with RoPE, 8 routed experts top-2 of width 64 in 2 groups keep 1,
sigmoid + bias routing renormalised, 1 shared expert, tied LM head), the same step (forward,
cross-entropy, backward, AdamW with grad-norm clipping) at batch 256 x 8 tokens.

The experts run as Hugging Face's Qwen3-MoE / DeepSeek-V3 modelling code does in eager mode: a
loop over experts, each gathering its tokens, a SwiGLU, and index_add_ of the weighted result.

With --hf it instead times what a PyTorch user would pick: Hugging Face transformers'
Qwen3-MoE (`Qwen3MoeForCausalLM`, eager attention) from scratch at the shape the issue quotes
(hidden 128, 4 layers, 4 heads, 8 experts top-2, expert width 64, about 1.06M parameters).

Usage: python3 benches/torch_moe_step.py [--threads N] [--steps S] [--hf]
Prints `TORCH-BENCH | model-train-step | ... | tokens/s |`. Needs torch (any recent CPU build)
and, for --hf, transformers; no GPU, no network, no weights.
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, D, L, H, SEQ, BATCH = 16, 128, 4, 4, 8, 256
E, K, I, SHARED, GROUPS, KEEP, DENSE_F = 8, 2, 64, 1, 2, 1, 256


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.g


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, 2 * f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.f = f

    def forward(self, x):
        g, u = self.w1(x).split(self.f, dim=-1)
        return self.w2(F.silu(g) * u)


def rope_tables(hd, n, theta=10000.0):
    freq = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freq[None, :]
    return ang.cos().float(), ang.sin().float()


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        cos, sin = rope_tables(D // H, SEQ)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x):
        b, t, _ = x.shape
        sh = lambda y: y.view(b, t, H, D // H).transpose(1, 2)
        q, k, v = sh(self.q(x)), sh(self.k(x)), sh(self.v(x))
        q, k = rope(q, self.cos[:t], self.sin[:t]), rope(k, self.cos[:t], self.sin[:t])
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(b, t, D))


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.register_buffer("bias", torch.zeros(E))
        self.experts = nn.ModuleList(SwiGLU(D, I) for _ in range(E))
        self.shared = SwiGLU(D, SHARED * I)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, D)
        s = torch.sigmoid(self.router(x))
        sel = (s + self.bias).detach()
        grp = sel.view(-1, GROUPS, E // GROUPS).topk(2, dim=-1).values.sum(-1)
        keep = grp.topk(KEEP, dim=-1).indices
        mask = torch.zeros_like(grp).scatter_(1, keep, 1.0).repeat_interleave(E // GROUPS, dim=1)
        ids = sel.masked_fill(mask == 0, float("-inf")).topk(K, dim=-1).indices
        w = s.gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            y = self.experts[e](x[tok]) * w[tok, slot, None]
            out.index_add_(0, tok, y)
        return (out + self.shared(x)).view(shape)


class Block(nn.Module):
    def __init__(self, dense):
        super().__init__()
        self.n1, self.attn, self.n2 = RMSNorm(D), Attention(), RMSNorm(D)
        self.ffn = SwiGLU(D, DENSE_F) if dense else MoE()

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.ffn(self.n2(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(l == 0) for l in range(L))
        self.norm = RMSNorm(D)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.norm(x) @ self.embed.weight.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hf", action="store_true", help="time transformers' Qwen3-MoE instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.hf:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
            head_dim=D // H, intermediate_size=DENSE_F, moe_intermediate_size=I, num_experts=E,
            num_experts_per_tok=K, max_position_embeddings=64, tie_word_embeddings=True,
            attn_implementation="eager",
        )
        model = Qwen3MoeForCausalLM(cfg)
        forward = lambda t: model(input_ids=t).logits
        name = "transformers Qwen3-MoE"
    else:
        model = Model()
        forward = model
        name = "same model as moekit's default"
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    tokens = torch.randint(0, V, (BATCH, SEQ))

    def step():
        logits = forward(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    print(
        f"TORCH-BENCH | model-train-step | {name}, torch {torch.__version__} eager, {params} params, "
        f"{BATCH} x {SEQ} tokens, {args.threads} threads | {med * 1e3:.2f} ms | {BATCH * SEQ / med:.0f} tokens/s |"
    )


if __name__ == "__main__":
    main()
