"""Training-step throughput: usae's step (sparse TopK decode, selection-based aux, bf16) vs a plain
dense fp32 PyTorch step of the same math -> a table of tokens/s and ratios, and a JSON file.

Both start from the same weights, see the same batches and the same source backbones, so their
loss trajectories must agree (the table shows the largest relative gap). Times are the median
of --repeats runs of --steps steps each, measured side by side in one process.

The `--aux dead` row is another objective (AuxK over dead concepts, Gao et al.), so its loss is
not compared: --dead-share of the concepts are held dead, the state of a run whose dead
tracker has found that many (every concept dead is its worst case, m/2 aux codes per token).

    python benchmarks/train_step.py                      # scaled-down CPU defaults
    python benchmarks/train_step.py --tokens 6272 --concepts 6144   # the paper's sizes
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from usae.trainer.config import TrainConfig
from usae.trainer.model import USAE, ModelSpec
from usae.trainer.state import TrainState, make_optimizer
from usae.trainer.train import StepContext, train_step

from usae.runtime import fast_bf16


def dense_step(
    model: USAE,
    opt: torch.optim.AdamW,
    i: int,
    x_list: list[torch.Tensor],
    cfg: TrainConfig,
    lr: float,
) -> float:
    """The obvious implementation: dense (tokens x m) codes, topk for the aux codes, fp32 matmuls."""
    opt.zero_grad(set_to_none=True)
    pre = model.bns[i](model.encoders[i](x_list[i]))
    act = F.relu(pre)
    v, ix = torch.topk(act, model.spec.k, dim=1)
    z = torch.zeros_like(act).scatter(1, ix, v)
    av, ai = torch.topk(act - z, act.shape[1] // 2, dim=1)
    a = torch.zeros_like(act).scatter(1, ai, av)
    loss = 0.0
    for j in range(model.n_models):
        d = model.decoders[j] / model.decoders[j].norm(dim=1, keepdim=True)
        r = x_list[j] - z @ d
        loss = loss + r.abs().mean() + cfg.aux_weight * (r - a @ d).abs().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.grad is not None], cfg.grad_clip
    )
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return float(loss.detach())


def make_batches(widths, tokens, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.relu(torch.randn(tokens, 64, generator=g)) for _ in range(n)]
    mix = [torch.randn(64, d, generator=g) / 8 for d in widths]
    return [
        [(la @ m + 0.1 * torch.randn(tokens, m.shape[1], generator=g)) for m in mix] for la in lat
    ]


def _fast_state(model: USAE, cfg: TrainConfig, seed: int, dead_share: float = 0.0) -> TrainState:
    """A state whose dead tracker holds `dead_share` of the concepts dead (never fired) and the
    others alive, with a window no step can cross."""
    n, m = model.n_models, model.spec.concepts
    last = torch.zeros(n, m, dtype=torch.long)
    dead = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[: int(dead_share * m)]
    last[:, dead] = -(10**15)
    return TrainState(
        model,
        make_optimizer(model, cfg),
        torch.Generator().manual_seed(seed),
        0,
        [0] * n,
        0,
        last,
        [None] * n,
    )


def run_fast(
    init: USAE, cfg: TrainConfig, batches, amp, sources, dead_share: float = 0.0
) -> tuple[float, list[float]]:
    """usae's train_step; step 1 warms up, steps 2..N are timed."""
    st = _fast_state(copy.deepcopy(init), cfg, SEED, dead_share)
    ctx = StepContext(cfg, 10**6, 0, 1, amp)
    outs = [train_step(st, ctx, batches[0])]
    t0 = time.perf_counter()
    outs += [train_step(st, ctx, x) for x in batches[1:]]
    dt = time.perf_counter() - t0
    assert sources is None or [o.sources[0] for o in outs] == sources, (
        "source draws differ between the implementations"
    )
    return dt, [o.loss for o in outs[1:]]


def run_dense(init: USAE, cfg: TrainConfig, batches, sources) -> tuple[float, list[float]]:
    """The dense fp32 baseline; step 1 warms up, steps 2..N are timed."""
    model = copy.deepcopy(init)
    opt = make_optimizer(model, cfg)
    dense_step(model, opt, sources[0], batches[0], cfg, cfg.lr)
    t0 = time.perf_counter()
    losses = [
        dense_step(model, opt, i, x, cfg, cfg.lr)
        for x, i in zip(batches[1:], sources[1:], strict=True)
    ]
    return time.perf_counter() - t0, losses


SEED = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per batch")
    ap.add_argument("--widths", default="384,768,768", help="backbone widths")
    ap.add_argument("--concepts", type=int, default=6144, help="concepts m")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument(
        "--dead-share", type=float, default=0.1, help="concepts held dead in the --aux dead row"
    )
    ap.add_argument("--out", default="benchmarks/train_step.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    widths = tuple(int(w) for w in a.widths.split(","))
    spec = ModelSpec(
        tuple(f"m{j}" for j in range(len(widths))),
        widths,
        (0.0,) * len(widths),
        (1.0,) * len(widths),
        a.concepts,
        a.k,
    )
    cfg = TrainConfig(
        lr=3e-4, recipe="paper"
    )  # the paper's step; constant lr (no schedule) in both
    torch.manual_seed(0)
    init = USAE(spec).train()
    batches = make_batches(widths, a.tokens, a.steps + 1)
    g = torch.Generator().manual_seed(SEED)  # the same draws train_step makes
    sources = [int(torch.randint(len(widths), (1,), generator=g)) for _ in batches]
    dead_cfg = replace(cfg, aux="dead", dead_window_tokens=10**12)
    # the default recipe, whose step is other math (every backbone a source on its share of the
    # batch, gains, a decoder bias), without and with its code agreement (on from step 1 here)
    fid_init = USAE(replace(spec, decoder_init="unit", gains=True, decoder_bias=True)).train()
    fid_cfg = TrainConfig(lr=3e-4, recipe="fidelity", agree_weight=0.0)
    agree_cfg = replace(fid_cfg, agree_weight=1.0, agree_start=0.0)
    cfgs = {"fid": fid_cfg, "agree": agree_cfg, "agree_adamw": replace(agree_cfg, optimizer="adamw"),
            "agree_row": replace(agree_cfg, optimizer="rowadamw")}  # fmt: skip
    variants = {
        "dense fp32 (baseline)": "dense",
        "usae fp32": None,
        f"usae fp32 --aux dead ({a.dead_share:.0%} dead)": "dead",
        "fidelity fp32, agreement off": "fid",
        "fidelity fp32 (default)": "agree",
        "fidelity fp32, --optimizer adamw": "agree_adamw",
        "fidelity fp32, --optimizer rowadamw": "agree_row",
    }
    if fast_bf16("cpu"):
        variants["usae bf16"] = torch.bfloat16
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for name, kind in variants.items():  # side by side, interleaved
            if kind == "dense":
                dt, ls = run_dense(init, cfg, batches, sources)
            elif kind == "dead":
                dt, ls = run_fast(init, dead_cfg, batches, None, sources, a.dead_share)
            elif kind in cfgs:
                dt, ls = run_fast(fid_init, cfgs[kind], batches, None, None)
            else:
                dt, ls = run_fast(init, cfg, batches, kind, sources)
            times[name].append(dt)
            losses[name] = ls
    report(a, variants, times, losses)


def report(a, variants, times, losses) -> None:
    base = statistics.median(times["dense fp32 (baseline)"])
    ref = losses["dense fp32 (baseline)"]
    rows = []
    print(
        f"\ntraining step, {a.tokens} tokens/batch, widths {a.widths}, m={a.concepts}, k={a.k}, "
        f"median of {a.repeats} x {a.steps} steps, {torch.get_num_threads()} threads"
    )
    print(f"{'variant':30} {'tokens/s':>10} {'speed-up':>9} {'max |dloss|/loss':>17}")
    for name in variants:
        med = statistics.median(times[name])
        tps = a.tokens * a.steps / med
        gap = max(abs(x - y) / abs(y) for x, y in zip(losses[name], ref, strict=True))
        if "aux dead" in name or "fidelity" in name:  # other objectives: not the baseline's loss
            gap = float("nan")
        rows.append(
            {
                "variant": name,
                "tokens_per_s": tps,
                "speedup": base / med,
                "max_rel_loss_gap": gap,
                "times_s": times[name],
                "losses": losses[name],
            }
        )
        print(f"{name:30} {tps:10.0f} {base / med:8.2f}x {gap:17.2e}")
    fid = {
        r["variant"]: statistics.median(r["times_s"]) for r in rows if "fidelity" in r["variant"]
    }
    if len(fid) == 2:
        print(
            f"code agreement: the default recipe's step takes {fid['fidelity fp32 (default)'] / fid['fidelity fp32, agreement off']:.2f}x its step without it"
        )
    print("loss per timed step:")
    for name in variants:
        print(f"  {name:30} " + " ".join(f"{x:.6f}" for x in losses[name]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
