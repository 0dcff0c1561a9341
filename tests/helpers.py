"""Helpers shared by several test modules (importable as ``helpers``: pytest puts tests/ on sys.path)."""

import torch


def greedy(model, ids, n=12):
    """Prefill ``ids`` then decode ``n`` tokens greedily on the model's device.

    Returns (tokens, logits rows [n + 1, V] float32): the prompt's last row, then one per decode step.
    """
    dev = model.lm_head.weight.device
    cache = model.new_cache(len(ids) + n + 1)
    logits = model(torch.tensor([ids], device=dev), 0, cache)
    out, rows, pos = [], [logits[0, -1].float()], len(ids)
    for _ in range(n):
        t = int(logits[0, -1].argmax())
        out.append(t)
        logits = model(torch.tensor([[t]], device=dev), pos, cache)
        rows.append(logits[0, -1].float())
        pos += 1
    return out, torch.stack(rows)
