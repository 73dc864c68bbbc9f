"""Parameter bookkeeping: the trainable/frozen table each stage logs, and AdamW parameter groups."""

from __future__ import annotations

from torch import nn

from ..model.shapes import full_numel


def param_table(components: dict[str, nn.Module]) -> str:
    """A text table of trainable and frozen parameter counts per component."""
    rows = [("component", "trainable", "frozen", "total")]
    totals = [0, 0]
    for name, module in components.items():
        trainable = sum(full_numel(p) for p in module.parameters() if p.requires_grad)
        frozen = sum(full_numel(p) for p in module.parameters() if not p.requires_grad)
        totals[0] += trainable
        totals[1] += frozen
        rows.append((name, f"{trainable:,}", f"{frozen:,}", f"{trainable + frozen:,}"))
    rows.append(("all", f"{totals[0]:,}", f"{totals[1]:,}", f"{sum(totals):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and every 1-D tensor (LayerNorm / RMSNorm weights, embeddings scales) take no weight decay.
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(
    components: dict[str, tuple[nn.Module | nn.Parameter, float]], weight_decay: float
) -> list[dict]:
    """AdamW groups: per component (module or lone parameter, lr), split into decay / no-decay; frozen
    parameters left out."""
    groups = []
    for name, (module, lr) in components.items():
        decay, no_decay = [], []
        named = module.named_parameters() if isinstance(module, nn.Module) else [(name, module)]
        for pname, p in named:
            if p.requires_grad:
                (no_decay if _no_decay(pname, p) else decay).append(p)
        if decay:
            groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"name": f"{name}/no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups
