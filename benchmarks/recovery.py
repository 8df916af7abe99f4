"""Planted stores (`usae synth`) x USAE recipes -> planted recovery per group, member-set accuracy,
held-out R2 -> a table and a JSON file (the fidelity issue's benchmark; prototype trainer).

A minimal, self-contained USAE trainer (one screen of math, see `Recipe`), so that recipe
options can be measured against planted truth before they go into the real trainer.
`--recipe paper` is usae-spec.md sections 2-3 exactly: scalar standardisation, Linear -> BN ->
ReLU -> TopK, unit-norm decoder rows (randn init, normalised at use), L1 summed over every
target model + 0.1 x aux (top m/2 non-selected positive pre-activations), AdamW wd 1e-5,
linear warm-up then cosine decay to 1e-6, global grad-norm clip 1.0, source model uniform per
step, every decoder learns ("paper" update).

Recovery (usae.trainer.truth.recovery_from_decoders): a planted concept is recovered when ONE
learned concept's decoder rows reach cosine >= 0.9 with its direction in EVERY model it lives
in (the min over member models). Member sets come from usae.analysis.membership.

    python benchmarks/recovery.py --stores m3 --recipes paper,fid          # one store, two recipes
    python benchmarks/recovery.py --stores m2,m3,m5,m8,m3hard,m5hard --recipes fid  # the acceptance grid
    python benchmarks/recovery.py --stores m3shuffle --recipes fid         # control: recovers nothing
    python benchmarks/recovery.py --stores m3 --recipes fid --set steps=0  # control: untrained

Stores are written on first use under --root (reused afterwards). One run is 2-10 minutes on
one busy core of this machine (M=8 with sources=split is the slowest: ~570 s under load).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from usae.analysis.membership import member_matrix
from usae.pipeline.store import Store
from usae.trainer.synth import SynthConfig, run_synth
from usae.trainer.truth import load_truth, recovery_from_decoders


# ---------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """One training recipe; `paper` is usae-spec.md exactly."""

    concepts: int = 256
    """m, learned concepts."""
    k: int = 4
    """TopK."""
    lr: float = 3e-3
    """Peak learning rate."""
    lr_min: float = 1e-6
    """End of the cosine decay (schedule=cosine)."""
    steps: int = 3000
    """Optimiser steps."""
    batch: int = 1024
    """Tokens per step."""
    warmup: int = 100
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """cosine (to lr_min) | constant (after warm-up) | decay10 (constant, then linear to 0 over the last 10%)."""
    dec_init: str = "randn"
    """randn (paper: rows of norm ~sqrt(d), normalised at use) | unit (unit rows) | enc_t (encoder transpose)."""
    gains: str = "none"
    """none | softplus: decoder row = softplus(s_jk) * unit(D_j[k]), a per-model gain that can approach 0."""
    center: str = "none"
    """none (scalar standardisation only) | mean (also subtract the per-channel mean) | bias (learnable decoder bias)."""
    bn: bool = True
    """BatchNorm1d on the pre-activations (paper) or not."""
    aux: str = "paper"
    """paper (top m/2 non-selected) | auxk (top k_aux dead latents, Gao et al.) | none."""
    aux_weight: float = 0.1
    """Weight of the aux term."""
    loss_norm: str = "sum"
    """sum over target models (paper) | mean (divide by M) | balanced (self 1/2, others 1/(2(M-1)))."""
    sources: str = "one"
    """one (a source drawn uniformly per step, paper) | split (the step's tokens split evenly among
    ALL models as sources: same tokens and cost per step, every model is a source every step)."""
    gain_l1: float = 0.0
    """Penalty lambda * mean_t sum_k z_tk g_jk / d_j per target j (drives absent models' gains to 0)."""
    wd: float = 1e-5
    """AdamW weight decay."""
    clip: float = 1.0
    """Global grad-norm clip."""
    seed: int = 0
    """Seed of init and batches."""


PAPER = Recipe()
RECIPES = {
    "paper": PAPER,
    "paper-unit": replace(PAPER, dec_init="unit"),
    "paper-unit-const": replace(PAPER, dec_init="unit", schedule="constant"),
    "gain": replace(PAPER, dec_init="unit", schedule="decay10", gains="softplus"),
    "gain-bias": replace(PAPER, dec_init="unit", schedule="decay10", gains="softplus", center="bias"),
    "gain-mean": replace(PAPER, dec_init="unit", schedule="decay10", gains="softplus", center="mean"),
    # recommended: unit-init rows with a per-model softplus gain, learnable decoder bias (also
    # subtracted before the encoder), mean over target models, constant lr with a 10% linear tail,
    # every model a source in every step on its share of the tokens
    "fid": replace(PAPER, dec_init="unit", schedule="decay10", gains="softplus", center="bias", loss_norm="mean",
                   sources="split"),
}
RECIPES.update({
    "fid-split": RECIPES["fid"],  # alias (the name the measurements used)
    "fid-one": replace(RECIPES["fid"], sources="one"),  # one source drawn per step (paper's sampling)
    "fid-bias": replace(RECIPES["fid"], sources="one"),  # alias of fid-one (the name the measurements used)
    "fid-mean": replace(RECIPES["fid"], center="mean"),  # per-channel mean subtracted instead of a bias
    "fid-auxk": replace(RECIPES["fid"], aux="auxk"),
    "fid-noaux": replace(RECIPES["fid"], aux="none"),
    "fid-sum": replace(RECIPES["fid"], loss_norm="sum"),
    "fid-nobn": replace(RECIPES["fid"], bn=False),
    "fid-cosine": replace(RECIPES["fid"], schedule="cosine"),
    "fid-randn": replace(RECIPES["fid"], dec_init="randn"),
    "fid-nogain": replace(RECIPES["fid"], gains="none"),
    "fid-l1": replace(RECIPES["fid"], center="mean", gain_l1=0.05),
    "fid-l1s": replace(RECIPES["fid"], center="mean", gain_l1=0.01),
})

# ---------------------------------------------------------------- stores
BASE = dict(tokens=80_000, tokens_per_image=16, active=3.0, noise=0.05, save_codes=False)
HARD = dict(gain=(0.5, 2.0), channel_offset=1.0, zipf=0.7, noise_decay=0.5)
STORES = {  # widths, groups and seeds differ from the tests' (tests use small widths and seeds 0-3)
    "m3": dict(models=3, dims=(112, 160, 144), groups="all:32,0+1:12,1+2:12,only:12", seed=11),
    "m3hard": dict(models=3, dims=(112, 160, 144), groups="all:32,0+1:12,1+2:12,only:12", seed=12, **HARD),
    "m2": dict(models=2, dims=(128, 176), groups="all:40,only:16", seed=13),
    "m2hard": dict(models=2, dims=(128, 176), groups="all:40,only:16", seed=14, **HARD),
    "m5": dict(models=5, dims=(96, 128, 160, 112, 144), groups="all:28,0+1:10,2+3+4:10,1+3:10,only:8", seed=15),
    "m5hard": dict(models=5, dims=(96, 128, 160, 112, 144), groups="all:28,0+1:10,2+3+4:10,1+3:10,only:8", seed=16, **HARD),
    "m8": dict(models=8, dims=(96, 112, 128, 144, 160, 104, 136, 120),
               groups="all:24,0+1:8,2+3+4:8,5+6:8,1+7:8,0+3+5+7:8,only:6", seed=17),
    "m3shuffle": dict(models=3, dims=(112, 160, 144), groups="all:32,0+1:12,1+2:12,only:12", seed=11,
                      shuffle_alignment=True),
}


def make_store(name: str, root: Path) -> Path:
    path = root / f"{name}.zarr"
    run_synth(SynthConfig(store=path, **{**BASE, **STORES[name]}), progress=False)
    return path


class Data:
    """All rows of every model as float32 tensors; the last 10% of images held out."""

    def __init__(self, path: Path):
        st = Store.open(path)
        self.keys = list(st.backbones)
        x = [torch.from_numpy(st.read_rows(k, 0, st.n_rows).astype(np.float32)) for k in self.keys]
        n_train = int(0.9 * st.n_images) * st.tokens_per_image
        self.train = [a[:n_train] for a in x]
        self.test = [a[n_train:] for a in x]


# ---------------------------------------------------------------- model
class MiniUSAE(nn.Module):
    def __init__(self, r: Recipe, train: list[Tensor]):
        super().__init__()
        self.r, m = r, r.concepts
        self.mu = [a.mean().item() for a in train]
        self.sigma = [a.std().item() for a in train]
        # per-channel mean of the scalar-standardised data (center=mean subtracts it, bias starts at it)
        self.cmean = [((a - mu) / (s + 1e-5)).mean(0) for a, mu, s in zip(train, self.mu, self.sigma, strict=True)]
        self.enc = nn.ModuleList(nn.Linear(a.shape[1], m) for a in train)
        self.bns = nn.ModuleList(nn.BatchNorm1d(m) if r.bn else nn.Identity() for _ in train)
        dec = []
        for e in self.enc:
            if r.dec_init == "randn":
                w = torch.randn(m, e.in_features)
            elif r.dec_init == "unit":
                w = F.normalize(torch.randn(m, e.in_features), dim=1)
            else:
                w = F.normalize(e.weight.detach().clone(), dim=1)
            dec.append(nn.Parameter(w))
        self.dec = nn.ParameterList(dec)
        g0 = math.log(math.e - 1)  # softplus(g0) = 1
        self.gain = nn.ParameterList(nn.Parameter(torch.full((m,), g0)) for _ in train) if r.gains == "softplus" else None
        self.bias = nn.ParameterList(nn.Parameter(c.clone()) for c in self.cmean) if r.center == "bias" else None

    def prep(self, i: int, a: Tensor) -> Tensor:
        x = (a - self.mu[i]) / (self.sigma[i] + 1e-5)
        return x - self.cmean[i] if self.r.center == "mean" else x

    def rows(self, j: int) -> Tensor:
        """Decoder of model j (m, d_j): unit rows, times the per-model gain when present."""
        w = F.normalize(self.dec[j], dim=1, eps=1e-12)
        return w * F.softplus(self.gain[j])[:, None] if self.gain is not None else w

    def gains_np(self) -> np.ndarray | None:
        return None if self.gain is None else np.stack([F.softplus(g).detach().numpy() for g in self.gain])

    def encode(self, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(values (b, k), indices (b, k), ReLU(pre) (b, m))."""
        pre = self.bns[i](self.enc[i](x - self.bias[i] if self.bias is not None else x))
        act = F.relu(pre)
        v, idx = act.topk(self.r.k, dim=1)
        return v, idx, act

    def decode(self, j: int, v: Tensor, idx: Tensor) -> Tensor:
        out = F.embedding_bag(idx, self.rows(j), per_sample_weights=v, mode="sum")
        return out + self.bias[j] if self.bias is not None else out


def _target_weights(r: Recipe, i: int, n: int) -> list[float]:
    if r.loss_norm == "sum":
        return [1.0] * n
    if r.loss_norm == "mean":
        return [1.0 / n] * n
    return [0.5 if j == i else 0.5 / max(1, n - 1) for j in range(n)] if n > 1 else [1.0]


def source_loss(model: MiniUSAE, i: int, xs: list[Tensor], dead: Tensor | None) -> tuple[Tensor, Tensor]:
    """Loss of source i over every target model (xs prepped), and which concepts fired."""
    r = model.r
    v, idx, act = model.encode(i, xs[i])
    za = None
    if r.aux == "paper":  # top m/2 of the non-selected positive pre-activations
        rest = act.scatter(1, idx, 0.0)
        va, ia = rest.topk(r.concepts // 2, dim=1)
        za = torch.zeros_like(rest).scatter(1, ia, va)
    elif r.aux == "auxk" and dead is not None and dead.any():
        masked = act.masked_fill(~dead, 0.0)
        va, ia = masked.topk(min(r.concepts // 2, int(dead.sum())), dim=1)
        za = torch.zeros_like(masked).scatter(1, ia, va)
    widths = [x.shape[1] for x in xs]
    w_cat = torch.cat([model.rows(j) for j in range(len(xs))], dim=1)  # one gather for all targets
    xh = F.embedding_bag(idx, w_cat, per_sample_weights=v, mode="sum")
    if model.bias is not None:
        xh = xh + torch.cat(list(model.bias))
    e = torch.cat(xs, dim=1) - xh
    per = [p.abs().mean() for p in e.split(widths, dim=1)]
    if za is not None:
        ea = (e.detach() if r.aux == "auxk" else e) - za @ w_cat
        per = [p + r.aux_weight * q.abs().mean() for p, q in zip(per, ea.split(widths, dim=1), strict=True)]
    if r.gain_l1 > 0 and model.gain is not None:
        per = [p + r.gain_l1 * (v * F.softplus(model.gain[j])[idx]).sum(1).mean() / widths[j]
               for j, p in enumerate(per)]
    wts = _target_weights(r, i, len(xs))
    fired = torch.zeros(r.concepts, dtype=torch.bool).index_fill_(0, idx.flatten(), True)
    return sum(w * p for w, p in zip(wts, per, strict=True)), fired


def lr_at(r: Recipe, t: int) -> float:
    if t < r.warmup:
        return r.lr * (t + 1) / r.warmup
    if r.schedule == "constant":
        return r.lr
    if r.schedule == "decay10":
        tail = max(1, r.steps // 10)
        return r.lr * min(1.0, (r.steps - t) / tail)
    p = min(1.0, (t - r.warmup) / max(1, r.steps - r.warmup))
    return r.lr_min + 0.5 * (r.lr - r.lr_min) * (1 + math.cos(math.pi * p))


def train(r: Recipe, data: Data) -> MiniUSAE:
    torch.manual_seed(r.seed)
    model = MiniUSAE(r, data.train)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.wd)
    gen = torch.Generator().manual_seed(r.seed)
    n, n_models = data.train[0].shape[0], len(data.train)
    since_fired = torch.zeros(r.concepts)  # tokens since each concept last fired (AuxK)
    dead_after = 40 * r.batch  # AuxK: dead = not fired in the last 40 steps' tokens
    for t in range(r.steps):
        rows = torch.randint(n, (r.batch,), generator=gen)
        if r.sources == "split":  # every model a source, on its own share of the step's tokens
            parts = list(zip(range(n_models), rows.tensor_split(n_models), strict=True))
        else:
            parts = [(int(torch.randint(n_models, (1,), generator=gen)), rows)]
        loss = 0.0
        for i, rows_i in parts:
            xs = [model.prep(j, a[rows_i]) for j, a in enumerate(data.train)]
            li, fired = source_loss(model, i, xs, since_fired > dead_after)
            loss = loss + li * len(rows_i) / r.batch
            since_fired = torch.where(fired, 0.0, since_fired + len(rows_i))
        for g in opt.param_groups:
            g["lr"] = lr_at(r, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if r.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.clip)
        opt.step()
    return model.eval()


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: MiniUSAE, data: Data, truth, tau: float = 0.1) -> dict:
    """Held-out R2 matrix (spec: scalar mean), per-model fires/energy, recovery and membership."""
    n_models, m = len(data.test), model.r.concepts
    xs = [model.prep(j, a) for j, a in enumerate(data.test)]
    # R2 in the scalar-standardised space (independent of centering, so recipes compare)
    raw = [(a - mu) / (s + 1e-5) for a, mu, s in zip(data.test, model.mu, model.sigma, strict=True)]
    shift = [model.cmean[j] if model.r.center == "mean" else 0.0 for j in range(n_models)]
    r2 = np.zeros((n_models, n_models))
    fires, energy = np.zeros((n_models, m)), np.zeros((n_models, m))
    for i in range(n_models):
        v, idx, _ = model.encode(i, xs[i])
        z = torch.zeros(len(v), m).scatter(1, idx, v)
        fires[i] = (z > tau).sum(0).numpy()
        energy[i] = (z.mean(0)[:, None] * model.rows(i)).norm(dim=1).numpy()
        for j in range(n_models):
            xh = model.decode(j, v, idx) + shift[j]
            r2[i, j] = 1 - ((raw[j] - xh) ** 2).mean().item() / ((raw[j] - raw[j].mean()) ** 2).mean().item()
    gains = model.gains_np()
    pred = member_matrix(fires, energy, gains)
    # decoders in truth.backbones order (the store's order is the same)
    rec = recovery_from_decoders([model.rows(j).numpy() for j in range(n_models)], truth, members_mk=pred)
    off = r2[~np.eye(n_models, dtype=bool)]
    return {
        "universal": rec.kind_rate["universal"], "subset": rec.kind_rate["subset"],
        "specific": rec.kind_rate["specific"], "membership": rec.membership_accuracy,
        "kind_membership": rec.kind_membership, "groups": rec.group_rate,
        "self_r2": float(np.diag(r2).mean()), "cross_r2": float(off.mean()) if len(off) else math.nan,
        "dead": float((fires.sum(0) == 0).mean()),
        "_stats": dict(fires=fires, energy=energy, gains=gains, match=rec.match_c, recovered=rec.recovered_c),
    }


def run_one(recipe: str, store: str, root: Path, over: dict) -> dict:
    path = root / f"{store}.zarr"
    if not (path / "_usae" / "truth.safetensors").exists():
        make_store(store, root)
    data, truth = Data(path), load_truth(path)
    r = replace(RECIPES[recipe], **over)
    t0 = time.perf_counter()
    model = train(r, data)
    wall = time.perf_counter() - t0
    res = evaluate(model, data, truth)
    res.update(recipe=recipe, store=store, steps=r.steps, wall_s=wall, settings=asdict(r))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", default="m3", help=f"comma-separated subset of {list(STORES)}")
    ap.add_argument("--recipes", default="paper,fid", help=f"comma-separated subset of {list(RECIPES)}")
    ap.add_argument("--root", default="/tmp/usae-recovery", help="where the planted stores are written (reused)")
    ap.add_argument("--set", default="", help="recipe overrides, e.g. steps=3000,lr=1e-3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="JSON output (default: print only)")
    ap.add_argument("--dump", default="", help="folder for per-run statistics (npz: fires, energy, gains, match)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    over = {}
    for kv in filter(None, a.set.split(",")):
        key, val = kv.split("=")
        typ = type(getattr(PAPER, key))
        over[key] = (val.lower() in ("1", "true")) if typ is bool else typ(val)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'recipe':18s} {'store':10s} {'univ':>5s} {'subset':>6s} {'spec':>5s} {'member':>6s} "
          f"{'selfR2':>6s} {'crossR2':>7s} {'dead':>5s} {'steps':>5s} {'wall_s':>6s}")
    for s in a.stores.split(","):
        for rc in a.recipes.split(","):
            res = run_one(rc, s, root, over)
            stats = res.pop("_stats")
            if a.dump:
                Path(a.dump).mkdir(parents=True, exist_ok=True)
                np.savez(Path(a.dump) / f"{rc}@{res['steps']}_{s}.npz", **{k: v for k, v in stats.items() if v is not None})
            rows.append(res)
            f = lambda v: "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.2f}"  # noqa: E731
            print(f"{rc:18s} {s:10s} {f(res['universal'])} {f(res['subset']):>6s} {f(res['specific'])} "
                  f"{f(res['membership']):>6s} {f(res['self_r2']):>6s} {f(res['cross_r2']):>7s} {f(res['dead'])} "
                  f"{res['steps']:5d} {res['wall_s']:6.0f}", flush=True)
            if a.out:  # after every run: an interrupted sweep keeps what it measured
                Path(a.out).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
