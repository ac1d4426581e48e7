"""A hand-written PyTorch GRPO step at timsim's standard shape: the yardstick of `timsim bench`.

The same model and work as timsim's standard step, written the way a careful PyTorch user
would: pre-LayerNorm transformer (d_model 64, 2 layers, 4 heads, MLP 256, tanh GELU, learned
positions, untied head), 32 prompts x 8 samples, prompt 16 and response 16 tokens, vocabulary
16. One step: KV-cache sampling (scaled-dot-product attention), rewards against the reversed
digits, group-normalised advantages, one learner forward and backward with the PPO-clip loss,
global-norm clipping and AdamW. It does no recompute forward and logs no diagnostics, which
timsim's step does. torch is not a timsim dependency: install the `bench` extra.

Run as a subprocess by `timsim bench` (``python -m timsim.bench_torch``): it warms up, prints
``ready``, then for every line ``steps K`` on stdin runs K steps and prints one JSON line with
their wall seconds. Started with ``--once K`` it runs K steps and prints their median.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D_MODEL, N_LAYERS, N_HEADS, D_MLP = 16, 64, 2, 4, 256
PROMPT, RESPONSE, PROMPTS, GROUP = 16, 16, 32, 8
EQ, EOS = 12, 11
D_HEAD, N = D_MODEL // N_HEADS, PROMPTS * GROUP


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_attn, self.ln_mlp = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv, self.attn_out = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)
        self.mlp_in, self.mlp_out = nn.Linear(D_MODEL, D_MLP), nn.Linear(D_MLP, D_MODEL)

    def heads(self, x):
        n, s, _ = x.shape
        return self.qkv(self.ln_attn(x)).view(n, s, 3, N_HEADS, D_HEAD).permute(2, 0, 3, 1, 4).unbind(0)

    def finish(self, x, attended):
        n, s = x.shape[:2]
        x = x + self.attn_out(attended.transpose(1, 2).reshape(n, s, D_MODEL))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x)), approximate="tanh"))

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True)), k, v

    def decode(self, x, pos, k_cache, v_cache):
        q, k, v = self.heads(x)
        k_cache[:, :, pos] = k[:, :, 0]
        v_cache[:, :, pos] = v[:, :, 0]
        attended = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])
        return self.finish(x, attended)


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos_embed = nn.Embedding(PROMPT + RESPONSE, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.ln_final = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, tokens):
        """Logits of every position and each layer's keys and values."""
        x = self.tok_embed(tokens) + self.pos_embed.weight[: tokens.shape[1]]
        cache = []
        for block in self.blocks:
            x, k, v = block(x)
            cache.append((k, v))
        return self.head(self.ln_final(x)), cache

    def decode(self, token, pos, caches):
        x = (self.tok_embed(token) + self.pos_embed.weight[pos])[:, None]
        for block, (k_cache, v_cache) in zip(self.blocks, caches):
            x = block.decode(x, pos, k_cache, v_cache)
        return self.head(self.ln_final(x))[:, 0]


@torch.no_grad()
def sample(policy: Policy, prompts):
    """Responses [N, RESPONSE] and the sampler's log-probs of them, with a KV cache."""
    logits, cache = policy(prompts[:, :-1])
    caches = []
    for k, v in cache:
        k_cache = torch.zeros(N, N_HEADS, PROMPT + RESPONSE, D_HEAD)
        v_cache = torch.zeros_like(k_cache)
        k_cache[:, :, : PROMPT - 1], v_cache[:, :, : PROMPT - 1] = k, v
        caches.append((k_cache, v_cache))
    token, tokens, logps = prompts[:, -1], [], []
    for t in range(RESPONSE):
        logp_all = F.log_softmax(policy.decode(token, PROMPT - 1 + t, caches), -1)
        token = torch.multinomial(logp_all.exp(), 1)[:, 0]
        tokens.append(token)
        logps.append(logp_all.gather(1, token[:, None])[:, 0])
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def grpo_step(policy: Policy, optimizer, generator) -> None:
    digits = torch.randint(0, 10, (PROMPTS, PROMPT - 1), generator=generator)
    prompts = torch.cat([digits, torch.full((PROMPTS, 1), EQ)], 1).repeat_interleave(GROUP, 0)
    target = torch.cat([digits.flip(1), torch.full((PROMPTS, 1), EOS)], 1).repeat_interleave(GROUP, 0)
    responses, logp_sampler = sample(policy, prompts)
    reward = (responses == target).all(1).float().view(PROMPTS, GROUP)
    adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)).view(N, 1)
    logits, _ = policy(torch.cat([prompts, responses], 1)[:, :-1])
    logp = F.log_softmax(logits[:, PROMPT - 1:], -1).gather(2, responses[..., None])[..., 0]
    ratio = (logp - logp_sampler).exp()
    loss = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()


def timed_steps(policy, optimizer, generator, steps: int) -> list[float]:
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        grpo_step(policy, optimizer, generator)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--once", type=int, default=0, help="run this many steps, print their median, exit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = Policy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    timed_steps(policy, optimizer, generator, args.warmup)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.once:
        seconds = sorted(timed_steps(policy, optimizer, generator, args.once))
        print(json.dumps({**info, "step_s": seconds[len(seconds) // 2]}), flush=True)
        return
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        steps = int(line.split()[1])
        print(json.dumps({"seconds": timed_steps(policy, optimizer, generator, steps)}), flush=True)


if __name__ == "__main__":
    main()
