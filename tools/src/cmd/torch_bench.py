"""The PyTorch side of `swarm bench model --vs-torch` (embedded in the swarm binary).

Trains HF transformers' LlamaForCausalLM (SDPA attention) with the run's model shape, micro-batch
geometry, AdamW hyper-parameters and gradient clipping, on random tokens, with the given thread
count, and prints one JSON object of median timings. argv[1] is a JSON object:
{"model": {...HF config fields...}, "train": {...}, "seed": int, "threads": int,
 "warmup": int, "steps": int}. Exit code 3 with {"error": ...} when torch/transformers are absent.
"""

import json
import statistics
import sys
import time


def main():
    cfg = json.loads(sys.argv[1])
    try:
        import torch
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(json.dumps({"error": f"cannot import {e.name}: {e}"}))
        sys.exit(3)

    threads = int(cfg["threads"])
    torch.set_num_threads(threads)
    torch.manual_seed(int(cfg["seed"]))
    m, t = cfg["model"], cfg["train"]
    config = LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m.get("num_key_value_heads") or m["num_attention_heads"],
        max_position_embeddings=m["max_position_embeddings"],
        rms_norm_eps=m["rms_norm_eps"],
        rope_theta=m["rope_theta"],
        tie_word_embeddings=m["tie_word_embeddings"],
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float().train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=t["lr"],
        betas=tuple(t["betas"]),
        eps=t["eps"],
        weight_decay=t["weight_decay"],
    )
    bs, seq, micro = t["micro_batch_size"], t["seq_len"], t["micro_batches"]
    vocab = m["vocab_size"]
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    fwd, bwd, optim, step = [], [], [], []
    for i in range(int(cfg["warmup"]) + max(1, int(cfg["steps"]))):
        s0 = time.perf_counter()
        f = b = 0.0
        for _ in range(micro):
            toks = torch.randint(0, vocab, (bs, seq + 1), generator=gen)
            a = time.perf_counter()
            logits = model(input_ids=toks[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab), toks[:, 1:].reshape(-1)
            ) / micro
            c = time.perf_counter()
            loss.backward()
            d = time.perf_counter()
            f += c - a
            b += d - c
        o0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        s1 = time.perf_counter()
        if i >= int(cfg["warmup"]):
            fwd.append(f / micro)
            bwd.append(b / micro)
            optim.append(s1 - o0)
            step.append(s1 - s0)
    med = statistics.median
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "parameters": params,
                "forward_ms": med(fwd) * 1e3,
                "backward_ms": med(bwd) * 1e3,
                "optimizer_ms": med(optim) * 1e3,
                "step_ms": med(step) * 1e3,
                "tokens_per_s": bs * seq * micro / med(step),
                "steps": len(step),
            }
        )
    )


if __name__ == "__main__":
    main()
