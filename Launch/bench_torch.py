#!/usr/bin/env python3
"""PyTorch peer benchmark for tensorar-bench (issue 18): a plain PyTorch model of SPEC section 2
(the LlamaGen class-to-image GPT: class and token embeddings, RMSNorm, fused wqkv, 2D rotary with a
zero class row, causal attention, SwiGLU, dropout 0.1 on the input sequence and after wo and w2,
cross entropy over V), forward + backward on the shapes tensorar-bench times, at 1 and N threads,
interleaved, best of --reps after a warm-up. A benchmark to run by hand, not a test:

    python3 -m venv /work/torchenv && /work/torchenv/bin/pip install torch
    /work/torchenv/bin/python Launch/bench_torch.py --preset B --batches 4 --threads 2

Compare the seconds with `tensorar-bench --presets B --batches 4 --window 0 --threads 2` run beside
it (ratios, not absolute times, on a shared machine). Better, on a machine whose speed moves from
minute to minute: `--ours .build/release/tensorar-bench` runs this project's step in a second process
(`tensorar-bench --serve`) and times the two in pairs, a step of each back to back at each thread
count, the order swapped every round, and prints each pair's ratio and their median:

    /work/torchenv/bin/python Launch/bench_torch.py --preset B --batches 4 --threads 2 --reps 8 \
        --ours .build/release/tensorar-bench
"""
import argparse
import math
import statistics
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {"small": (4, 4, 128), "B": (12, 12, 768), "L": (24, 16, 1024)}  # layers, heads, dim


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_table(seq_len, grid, head_dim, base=10000.0):
    """(S, hd/2) cos and sin: position 0 is the class slot (cos = sin = 0), p >= 1 grid cell p-1."""
    n = head_dim // 4
    freqs = base ** (-4.0 * torch.arange(n, dtype=torch.float64) / head_dim)
    cos = torch.zeros(seq_len, head_dim // 2, dtype=torch.float64)
    sin = torch.zeros_like(cos)
    for p in range(1, seq_len):
        r, c = (p - 1) // grid, (p - 1) % grid
        angles = torch.cat([r * freqs, c * freqs])
        cos[p], sin[p] = torch.cos(angles), torch.sin(angles)
    return cos.float(), sin.float()


def rotate(x, cos, sin):
    """x (B, S, NH, hd): pairs (x_2i, x_2i+1) rotated by angle i."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, dim, heads, ffn, p):
        super().__init__()
        self.heads, self.p = heads, p
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, cos, sin):
        B, S, D = x.shape
        hd = D // self.heads
        q, k, v = self.wqkv(self.attention_norm(x)).split(D, dim=-1)
        q = rotate(q.view(B, S, self.heads, hd), cos, sin).transpose(1, 2)
        k = rotate(k.view(B, S, self.heads, hd), cos, sin).transpose(1, 2)
        v = v.view(B, S, self.heads, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        h = x + F.dropout(self.wo(a), self.p, self.training)
        n = self.ffn_norm(h)
        return h + F.dropout(self.w2(F.silu(self.w1(n)) * self.w3(n)), self.p, self.training)


class GPT(nn.Module):
    def __init__(self, layers, heads, dim, vocab, classes, grid, p=0.1):
        super().__init__()
        self.p = p
        ffn = find_multiple(int(2 * 4 * dim / 3), 256)
        self.cls_embedding = nn.Embedding(classes + 1, dim)
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, ffn, p) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        for w in self.parameters():
            if w.dim() == 2:
                nn.init.normal_(w, std=0.02)
        cos, sin = rotary_table(grid * grid, grid, dim // heads)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, labels, tokens):
        """labels (B), tokens (B, T): position 0 the class, p >= 1 the token x_{p-1}; predicts x_p."""
        x = torch.cat([self.cls_embedding(labels)[:, None], self.tok_embeddings(tokens[:, :-1])], dim=1)
        x = F.dropout(x, self.p, self.training)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = self.output(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def step_seconds(model, labels, tokens):
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=False)
    model(labels, tokens).backward()
    return time.perf_counter() - t0


class OursServer:
    """This project's training step in its own process (`tensorar-bench --serve`): one step per request."""

    def __init__(self, binary, preset, batch):
        command = [binary, "--serve", "--presets", preset, "--batches", str(batch)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        for line in self.process.stdout:
            if line.strip() == "ready":
                return
        raise RuntimeError(f"{binary} --serve ended before it was ready (exit {self.process.wait()})")

    def step(self, threads):
        self.process.stdin.write(f"{threads}\n")
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError(f"tensorar-bench --serve ended (exit {self.process.wait()})")
        return float(reply)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def paired(model, labels, tokens, ours, counts, reps):
    """Times ours and the peer back to back at each thread count, reps rounds after a warm-up."""
    rows = []
    print("round threads  ours s  peer s  peer/ours  (round 0: warm-up)", flush=True)
    for rep in range(reps + 1):
        for n in counts:
            torch.set_num_threads(n)
            first_ours = rep % 2 == 0
            a = ours.step(n) if first_ours else step_seconds(model, labels, tokens)
            b = step_seconds(model, labels, tokens) if first_ours else ours.step(n)
            o, p = (a, b) if first_ours else (b, a)
            print(f"{rep:5d} {n:7d} {o:7.3f} {p:7.3f} {p / o:9.3f}", flush=True)
            if rep > 0:
                rows.append((rep, n, o, p))
    for n in counts:
        ratios = [p / o for _, m, o, p in rows if m == n]
        ahead = sum(r >= 1.1 for r in ratios)
        print(f"threads {n}: peer/ours median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
              f"{max(ratios):.3f}); {ahead} of {len(ratios)} pairs at least 1.1x")
    if len(counts) == 2:
        for who, i in (("ours", 2), ("peer", 3)):
            t1 = {r[0]: r[i] for r in rows if r[1] == 1}
            tn = {r[0]: r[i] for r in rows if r[1] == counts[1]}
            scaling = [t1[r] / tn[r] for r in t1]
            print(f"{who} scaling 1 -> {counts[1]} threads, per round: median {statistics.median(scaling):.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in scaling)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="B", choices=sorted(PRESETS))
    ap.add_argument("--batches", default="4", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=2, help="N: each run timed at 1 and N threads")
    ap.add_argument("--reps", type=int, default=2, help="timed steps per batch and thread count")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--ours", metavar="TENSORAR_BENCH", help="time this project's step in pairs with the peer's")
    args = ap.parse_args()
    layers, heads, dim = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPT(layers, heads, dim, args.vocab, args.classes, args.grid).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads by default")
    print(f"preset {args.preset}: {params} parameters; T = {args.grid ** 2}, V = {args.vocab}")
    counts = [1] if args.threads == 1 else [1, args.threads]
    print("batch threads  fwd+bwd s (best)  tokens/s  all times")
    for batch in [int(b) for b in args.batches.split(",")]:
        labels = torch.randint(0, args.classes, (batch,))
        tokens = torch.randint(0, args.vocab, (batch, args.grid ** 2))
        if args.ours:
            ours = OursServer(args.ours, args.preset, batch)
            paired(model, labels, tokens, ours, counts, args.reps)
            ours.close()
            continue
        times = {n: [] for n in counts}
        for rep in range(args.reps + 1):
            for n in counts:
                torch.set_num_threads(n)
                dt = step_seconds(model, labels, tokens)
                if rep > 0:
                    times[n].append(dt)
        for n in counts:
            best = min(times[n])
            shown = ", ".join(f"{t:.2f}" for t in times[n])
            print(f"{batch:5d} {n:7d} {best:17.3f} {batch * args.grid ** 2 / best:9.0f}  {shown}")
        if len(counts) == 2:
            print(f"      scaling 1 -> {counts[1]} threads: {min(times[1]) / min(times[counts[1]]):.2f}x")


if __name__ == "__main__":
    main()
