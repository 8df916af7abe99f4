"""Two runs on the same backbones -> their concepts matched one to one (`usae compare`):
DIR/compare.json, DIR/pairs.parquet, DIR/figures/*.png and DIR/index.html.

Do two trainings (two seeds, two recipes) learn the same concepts? Each concept's decoder rows
(unit rows of ``USAE.decoder_weight(j)``: the gains are not part of a direction) are matched by
Hungarian assignment (scipy ``linear_sum_assignment``, maximising the summed cosine):

- per model j, among the concepts that live in j in each run;
- jointly, among the live concepts of each run, on the joint cosine: by default (``members``)
  the mean of the per-model cosines over the models where BOTH concepts live. A concept absent
  from a model has its gain there near 0: its row in that model is no part of the concept
  (it reconstructs nothing) and only drifts, so its agreement is no evidence either way. Averaged
  over every model (``--joint all``), it still counts: on a planted store (tests/test_compare.py),
  two seeds' copies of concepts living in 2 of 3 models, at joint cosine >= 0.9 over those two,
  had a median of 0.88 over all three, across the 0.9 threshold for no reason in the concept.
  Pairs with no model in common cost -1 (never preferred). Whether the two concepts live in the
  same models is reported beside (``same_members``).

Member sets, importance and dead concepts come from each run's report (`usae analyze`, its
concepts.parquet) when given, else from one streaming pass over a store
(``usae.analysis.metrics.stream_sums`` + ``usae.analysis.membership.sharing``, as `usae analyze`
computes them). Dead concepts (no fire on the evaluated images) are left out of the assignment
and of every share, and counted. Shares are of the concepts of one run (A, and B in the same
file), broken down by member set and by importance decile (decile 1: the most important tenth
of the live concepts). The page is rendered from compare.json alone.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from usae.analysis.report import ImageChoice
from usae.trainer.model import USAE, load_run

from usae.errors import UsaeError
from usae.runtime import atomic_path, atomic_write, check_device_name

JointRule = Literal["members", "all"]
SCHEMA_VERSION = 1


class CompareError(UsaeError, ValueError):
    """Two runs cannot be compared (missing, other backbones or widths, a report that does not fit)."""


@dataclass(frozen=True)
class CompareConfig:
    """Match the concepts of two runs trained on the same backbones (Hungarian assignment on
    decoder cosine, per model and jointly) -> DIR/compare.json, pairs.parquet, index.html."""

    run_a: str
    """Run directory A (`usae train`)."""
    run_b: str
    """Run directory B, on the same backbones and widths."""
    out: str
    """Folder to write (created; its files are replaced)."""
    report_a: str = ""
    """Report of run A (`usae analyze`): member sets, importance and dead concepts from its concepts.parquet (default: computed from a pass over the store)."""
    report_b: str = ""
    """Report of run B (as --report-a)."""
    store: str = ""
    """Store of the pass that computes what a missing report would give (default: each run's training store, as its config.json records it)."""
    images: ImageChoice = "auto"
    """Images of that pass, as `usae analyze --images`: holdout, train, all, or auto (holdout when the run held some out)."""
    joint: JointRule = "members"
    """Joint cosine of two concepts: the mean over the models where both live (members), or over every model (all)."""
    thresholds: tuple[float, ...] = (0.7, 0.9)
    """A matched pair counts as the same concept at cosine >= each of these."""
    batch_tokens: int = 4096
    """Tokens encoded per batch in the store pass."""
    device: str = "cpu"
    """Torch device of the store pass: auto, cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if self.joint not in JointRule.__args__:
            raise CompareError(f"--joint must be one of {', '.join(JointRule.__args__)}")
        if not self.thresholds or not all(-1 <= t <= 1 for t in self.thresholds):
            raise CompareError("--thresholds must be cosines in [-1, 1]")
        if self.batch_tokens < 1:
            raise CompareError("--batch-tokens must be >= 1")
        check_device_name(self.device)


# ---------------------------------------------------------------- what each run's concepts are
class Profile(NamedTuple):
    """What the comparison needs to know of one run's concepts."""

    members_mk: np.ndarray
    """(M, m) bool: concept k lives in model i (all False when dead)."""
    labels: list[str]
    """Member set as text ("all", "a+b", "a"; "" when dead)."""
    importance_m: np.ndarray
    dead_m: np.ndarray
    source: str
    """Where it came from: "report PATH" or "store PATH (images)"."""


def load_model(run: str) -> tuple[USAE, dict]:
    try:
        return load_run(run)
    except UsaeError as e:
        raise CompareError(f"cannot load run {run}: {e}") from None
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        raise CompareError(f"cannot load run {run}: {e}") from None


def check_same_backbones(a: USAE, b: USAE, run_a: str, run_b: str) -> None:
    """Refuse runs on other backbones, other widths, other concept counts or of other kinds."""
    sa, sb = a.spec, b.spec
    if sa.backbones != sb.backbones:
        raise CompareError(
            f"the runs are on different backbones: {run_a} {list(sa.backbones)}, {run_b} {list(sb.backbones)}"
        )
    if sa.widths != sb.widths:
        raise CompareError(
            f"the runs' backbone widths differ: {run_a} {list(sa.widths)}, {run_b} {list(sb.widths)}"
        )
    if sa.independent != sb.independent:
        raise CompareError(
            "one run is --mode independent and the other is not: compare runs of one kind"
        )


def profile_from_report(report: str, keys: list[str], m: int) -> Profile:
    """A report's concepts.parquet (`usae analyze`) -> Profile; refuses one of another model."""
    path = Path(report) / "concepts.parquet"
    if not path.is_file():
        raise CompareError(f"{report} is not a usae report (no concepts.parquet)")
    meta = Path(report) / "metrics.json"
    if meta.is_file():
        got = json.loads(meta.read_text()).get("backbones")
        if got is not None and list(got) != keys:
            raise CompareError(f"report {report} is on backbones {got}, the run on {keys}")
    df = pd.read_parquet(path)
    need = ["concept", "importance", "dead", "members", *(f"member_{k}" for k in keys)]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise CompareError(f"report {report} lacks the columns {missing} (analyse the run again)")
    if len(df) != m or not np.array_equal(np.sort(df["concept"].to_numpy()), np.arange(m)):
        raise CompareError(f"report {report} has {len(df)} concepts, the run {m}")
    df = df.sort_values("concept")
    members = np.stack([df[f"member_{k}"].to_numpy(bool) for k in keys])
    return Profile(
        members, [str(x) for x in df["members"]], df["importance"].to_numpy(np.float64),
        df["dead"].to_numpy(bool), f"report {report}",
    )  # fmt: skip


def profile_from_store(run: str, store: str, cfg: CompareConfig) -> Profile:
    """One streaming pass over the store, as `usae analyze` makes it -> member sets, importance
    and dead concepts (``metrics.stream_sums``, ``metrics.concept_table``, ``membership.sharing``)."""
    from usae.analysis import membership
    from usae.analysis import metrics as mx
    from usae.analysis.report import AnalyzeConfig, load_inputs, select_images

    from usae.runtime import resolve_device

    if not store:
        _, run_cfg = load_model(run)
        store = str((run_cfg.get("store") or {}).get("path") or "")
        if not store:
            raise CompareError(f"run {run} records no store: give its report or --store")
    inp = load_inputs(AnalyzeConfig(run=run, store=store, out="", images=cfg.images))
    mask, which = select_images(inp.store, inp.run_cfg, cfg.images, inp.same_store)
    sums = mx.stream_sums(inp.model, inp.store, inp.keys, mask, batch_tokens=cfg.batch_tokens,
                          top_images=0, device=resolve_device(cfg.device))  # fmt: skip
    with torch.no_grad():
        gains = np.stack(
            [inp.model.gain(j).double().cpu().numpy() for j in range(inp.model.n_models)]
        )
    table = mx.concept_table(sums, gains)
    sh = membership.sharing(inp.model, inp.keys, table, gains)
    return Profile(
        sh.members_mk, sh.labels, table.importance_m, table.dead_m, f"store {store} ({which})"
    )


# ---------------------------------------------------------------- the matching
class Matching(NamedTuple):
    """Both assignments, indexed by A's concepts (partner -1 / cosine NaN: not matched)."""

    model_partner_jm: np.ndarray
    """(M, m) the concept of B matched to each of A's in model j alone."""
    model_cosine_jm: np.ndarray
    """(M, m) that pair's cosine in model j."""
    partner_m: np.ndarray
    """(m,) the concept of B matched jointly (-1 when dead in A, or none left)."""
    joint_m: np.ndarray
    """(m,) the joint cosine of that pair (NaN: unmatched)."""
    pair_cosine_jm: np.ndarray
    """(M, m) the jointly matched pair's cosine in each model (NaN: unmatched)."""
    seconds: dict
    """Time of each assignment (scipy's linear_sum_assignment alone), per model key and "joint"."""


def unit_rows(model: USAE) -> list[np.ndarray]:
    """Each model's decoder as unit rows (float32), without the gains."""
    with torch.no_grad():
        out = []
        for j in range(model.n_models):
            w = model.decoder_weight(j).float()
            out.append((w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy())
    return out


def assign(cost_ab: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, float]:
    """Hungarian assignment of the rows to the columns maximising the summed cost ->
    (len(cost_ab),) partner (-1: not matched) and the seconds it took."""
    from scipy.optimize import linear_sum_assignment

    partner = np.full(cost_ab.shape[0], -1, np.int64)
    if len(rows) and len(cols):
        sub = cost_ab[np.ix_(rows, cols)]
        t0 = time.perf_counter()
        r, c = linear_sum_assignment(sub, maximize=True)
        dt = time.perf_counter() - t0
        partner[rows[r]] = cols[c]
        return partner, dt
    return partner, 0.0


def match_runs(
    dec_a: list[np.ndarray], dec_b: list[np.ndarray], pa: Profile, pb: Profile, keys: list[str],
    joint: JointRule = "members", with_joint: bool = True,
) -> Matching:  # fmt: skip
    """Per model: concepts living in j in each run; jointly: the live concepts of each run, on
    the joint cosine (``joint``: mean over the models where both live, or over every model)."""
    n_models, m = len(dec_a), dec_a[0].shape[0]
    mp = np.full((n_models, m), -1, np.int64)
    mc = np.full((n_models, m), np.nan)
    num = np.zeros((m, dec_b[0].shape[0]), np.float32)
    den = np.zeros(num.shape, np.float32)
    seconds, cos_all = {}, []
    for j in range(n_models):
        cos = dec_a[j] @ dec_b[j].T  # (m_a, m_b) float32
        ra, rb = np.flatnonzero(pa.members_mk[j]), np.flatnonzero(pb.members_mk[j])
        mp[j], seconds[keys[j]] = assign(cos, ra, rb)
        ok = mp[j] >= 0
        mc[j, ok] = cos[ok, mp[j, ok]]
        if with_joint:
            if joint == "members":
                both = pa.members_mk[j][:, None] & pb.members_mk[j][None, :]
                num += np.where(both, cos, 0.0)
                den += both
            else:
                num += cos
                den += 1.0
        cos_all.append(cos)
    partner = np.full(m, -1, np.int64)
    joint_m, pair = np.full(m, np.nan), np.full((n_models, m), np.nan)
    if with_joint:
        cost = np.where(den > 0, num / np.maximum(den, 1), np.float32(-1.0))
        del num, den
        partner, seconds["joint"] = assign(
            cost, np.flatnonzero(~pa.dead_m), np.flatnonzero(~pb.dead_m)
        )
        ok = partner >= 0
        joint_m[ok] = cost[ok, partner[ok]]
        for j, cos in enumerate(cos_all):
            pair[j, ok] = cos[ok, partner[ok]]
    return Matching(mp, mc, partner, joint_m, pair, seconds)


def recovered_agreement(partner_m: np.ndarray, rec_a, rec_b) -> dict:
    """Planted truth (``usae.trainer.truth.Recovery`` of each run): of the planted concepts
    recovered by both runs, the share whose recovered learned concepts the joint matching pairs
    with each other (A's concept ``rec_a.match_c`` matched to B's ``rec_b.match_c``)."""
    both = np.asarray(rec_a.recovered_c, bool) & np.asarray(rec_b.recovered_c, bool)
    hit = partner_m[rec_a.match_c[both]] == rec_b.match_c[both]
    return {
        "planted": int(len(both)),
        "recovered_both": int(both.sum()),
        "matched_to_each_other": int(hit.sum()),
        "share": float(hit.mean()) if both.any() else float("nan"),
    }


# ---------------------------------------------------------------- summaries
def shares(cos: np.ndarray, thresholds: tuple[float, ...]) -> dict:
    """{n, matched_T per threshold (unmatched: NaN, counts as not matched), mean/median cosine}."""
    c = np.asarray(cos, np.float64)
    fin = c[np.isfinite(c)]
    out: dict = {"n": int(c.size)}
    for t in thresholds:
        out[f"matched_{t:g}"] = (
            float(np.mean(np.nan_to_num(c, nan=-np.inf) >= t)) if c.size else None
        )
    out["mean_cosine"] = float(fin.mean()) if fin.size else None
    out["median_cosine"] = float(np.median(fin)) if fin.size else None
    return out


def label_order(labels: list[str], keys: list[str]) -> list[str]:
    """ "all" first, then member sets by size (largest first), each in the order of the models."""
    seen = sorted({x for x in labels if x})

    def key(lab: str) -> tuple:
        parts = keys if lab == "all" else lab.split("+")
        return (-len(parts), [keys.index(p) if p in keys else len(keys) for p in parts])

    return sorted(seen, key=key)


def side_summary(
    cos_m: np.ndarray, same_m: np.ndarray, p: Profile, keys: list[str], th: tuple[float, ...]
) -> dict:
    """One run's live concepts: shares of the joint cosine of each one's partner, by member set
    and by importance decile (1: the most important tenth)."""
    live = np.flatnonzero(~p.dead_m)
    labels = np.asarray(p.labels, dtype=object)
    by_set = {}
    for lab in label_order([p.labels[k] for k in live], keys):
        sel = live[labels[live] == lab]
        by_set[lab] = {**shares(cos_m[sel], th), "same_members": float(same_m[sel].mean())}
    order = live[np.argsort(-p.importance_m[live], kind="stable")]
    dec = (np.arange(len(order)) * 10) // max(len(order), 1)
    deciles = []
    for d in range(10):
        sel = order[dec == d]
        if len(sel):
            imp = p.importance_m[sel]
            deciles.append({"decile": d + 1, **shares(cos_m[sel], th), "importance_max": float(imp.max()),
                            "importance_min": float(imp.min())})  # fmt: skip
    return {"live": int(len(live)), "dead": int(p.dead_m.sum()), "all_live": shares(cos_m[live], th),
            "by_members": by_set, "by_importance_decile": deciles}  # fmt: skip


def summarize(
    mt: Matching, pa: Profile, pb: Profile, keys: list[str], th: tuple[float, ...]
) -> dict:
    """compare.json's findings: per model, jointly, and each side by member set and decile."""
    m_b = len(pb.dead_m)
    inv = np.full(m_b, -1, np.int64)
    ok = mt.partner_m >= 0
    inv[mt.partner_m[ok]] = np.flatnonzero(ok)
    cos_b = np.full(m_b, np.nan)
    cos_b[inv >= 0] = mt.joint_m[inv[inv >= 0]]
    la, lb = np.asarray(pa.labels, dtype=object), np.asarray(pb.labels, dtype=object)
    same_a = np.zeros(len(la), bool)
    same_a[ok] = la[ok] == lb[mt.partner_m[ok]]
    same_b = np.zeros(m_b, bool)
    same_b[inv >= 0] = lb[inv >= 0] == la[inv[inv >= 0]]
    per_model = {}
    for j, k in enumerate(keys):
        sel = np.flatnonzero(pa.members_mk[j])
        per_model[k] = {
            **shares(mt.model_cosine_jm[j, sel], th),
            "n_b": int(pb.members_mk[j].sum()),
        }
    joint = None if "joint" not in mt.seconds else {
        "a": side_summary(mt.joint_m, same_a, pa, keys, th),
        "b": side_summary(cos_b, same_b, pb, keys, th),
    }  # fmt: skip
    return {"per_model": per_model, "joint": joint}


def pairs_frame(mt: Matching, pa: Profile, pb: Profile, keys: list[str]) -> pd.DataFrame:
    """pairs.parquet: one row per concept of A: its joint partner in B and their cosines."""
    ok = mt.partner_m >= 0
    lb = np.asarray(pb.labels, dtype=object)
    cols: dict = {
        "concept_a": np.arange(len(mt.partner_m)),
        "concept_b": mt.partner_m,
        "joint": mt.joint_m,
    }
    for j, k in enumerate(keys):
        cols[f"cosine_{k}"] = mt.pair_cosine_jm[j]
    cols["members_a"] = pa.labels
    cols["members_b"] = np.where(ok, lb[np.maximum(mt.partner_m, 0)], "")
    cols["importance_a"] = pa.importance_m
    cols["importance_b"] = np.where(ok, pb.importance_m[np.maximum(mt.partner_m, 0)], np.nan)
    cols["dead_a"] = pa.dead_m
    for j, k in enumerate(keys):
        cols[f"model_partner_{k}"] = mt.model_partner_jm[j]
        cols[f"model_cosine_{k}"] = mt.model_cosine_jm[j]
    return pd.DataFrame(cols)


# ---------------------------------------------------------------- the command
class CompareResult(NamedTuple):
    out: Path
    summary: dict
    pairs: pd.DataFrame


def run_compare(cfg: CompareConfig) -> CompareResult:
    """Load both runs, profile their concepts, match them, write the folder and its page."""
    t0 = time.perf_counter()
    a, _ = load_model(cfg.run_a)
    b, _ = load_model(cfg.run_b)
    check_same_backbones(a, b, cfg.run_a, cfg.run_b)
    keys, m = list(a.spec.backbones), a.spec.concepts
    pa = (profile_from_report(cfg.report_a, keys, m) if cfg.report_a
          else profile_from_store(cfg.run_a, cfg.store, cfg))  # fmt: skip
    pb = (profile_from_report(cfg.report_b, keys, b.spec.concepts) if cfg.report_b
          else profile_from_store(cfg.run_b, cfg.store, cfg))  # fmt: skip
    warnings = []
    if a.spec.independent:
        warnings.append("independent SAEs: concept k of one model is unrelated to concept k of "
                        "another, so only the per-model matching is made")  # fmt: skip
    mt = match_runs(unit_rows(a), unit_rows(b), pa, pb, keys, cfg.joint, not a.spec.independent)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "run_a": cfg.run_a,
        "run_b": cfg.run_b,
        "backbones": keys,
        "concepts": {"a": m, "b": b.spec.concepts},
        "joint_rule": cfg.joint,
        "thresholds": list(cfg.thresholds),
        "membership": {"a": pa.source, "b": pb.source},
        **summarize(mt, pa, pb, keys, cfg.thresholds),
        "assignment_seconds": mt.seconds,
        "seconds": time.perf_counter() - t0,
        "warnings": warnings,
        "config": asdict(cfg),
    }
    out = Path(cfg.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    df = pairs_frame(mt, pa, pb, keys)
    with atomic_path(out / "pairs.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    from usae.analysis.report import _clean

    clean = _clean(summary)
    atomic_write(out / "compare.json", json.dumps(clean, indent=1, allow_nan=False))
    draw_figures(out / "figures", df, clean)
    render_compare(out)
    return CompareResult(out, clean, df)


# ---------------------------------------------------------------- figures and page
def draw_figures(fig_dir: Path, df: pd.DataFrame, s: dict) -> None:
    """cosine_histogram.png (joint and per-model cosines of A's live concepts) and, with a
    joint matching, matched_by_decile.png (share matched per importance decile, each threshold)."""
    from usae.analysis.figures import pyplot, save_png

    plt = pyplot()
    keys, live = s["backbones"], ~df["dead_a"].to_numpy(bool)
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    bins = np.linspace(-0.2, 1.0, 49)
    series = [("joint", df["joint"].to_numpy()[live])] if s["joint"] else []
    series += [(k, df[f"model_cosine_{k}"].to_numpy()) for k in keys]
    for name, v in series:
        v = v[np.isfinite(v)]
        ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.6 if name == "joint" else 1.0,
                label=f"{name} ({len(v)})")  # fmt: skip
    for t in s["thresholds"]:
        ax.axvline(t, color="#999", ls=":", lw=1)
    ax.set(xlabel="cosine of the matched pair", ylabel="concepts of A", yscale="log",
           title="matched cosines")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, fig_dir / "cosine_histogram.png", 110)
    plt.close(fig)
    path = fig_dir / "matched_by_decile.png"
    if not s["joint"]:
        path.unlink(missing_ok=True)
        return
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for side, ls in (("a", "-"), ("b", "--")):
        rows = s["joint"][side]["by_importance_decile"]
        for t in s["thresholds"]:
            ax.plot([r["decile"] for r in rows], [r[f"matched_{t:g}"] for r in rows], ls, marker="o",
                    ms=3, label=f"{side.upper()}: cos >= {t:g}")  # fmt: skip
    ax.set(xlabel="importance decile (1: most important)", ylabel="share matched jointly", ylim=(-0.02, 1.02),
           xticks=range(1, 11), title="matched share vs importance")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, 110)
    plt.close(fig)


def _share_cells(r: dict, th: list[float]) -> str:
    from usae.analysis.render import table_cell

    return (
        table_cell(r["n"], "{:d}")
        + "".join(table_cell(r[f"matched_{t:g}"]) for t in th)
        + table_cell(r["mean_cosine"])
    )


def render_compare(out: str | Path) -> Path:
    """DIR/compare.json -> DIR/index.html (self-contained: embedded CSS, relative figure links)."""
    from usae.analysis.render import fmt_value, html_page, summary_card, table_cell

    out, esc = Path(out), html.escape
    s = json.loads((out / "compare.json").read_text())
    th, keys, j = s["thresholds"], s["backbones"], s["joint"]
    head = "<th>n</th>" + "".join(f"<th>cos &ge; {t:g}</th>" for t in th) + "<th>mean cosine</th>"
    cards = []
    if j:
        cards += [
            summary_card(
                fmt_value(j["a"]["all_live"][f"matched_{t:g}"]), f"joint, matched at cos >= {t:g}"
            )
            for t in th
        ]
        cards += [
            summary_card(f"{j['a']['dead']} / {j['b']['dead']}", "dead concepts A / B (left out)")
        ]
    cards += [
        summary_card(fmt_value(v[f"matched_{th[0]:g}"]), f"{k} alone, cos >= {th[0]:g}")
        for k, v in s["per_model"].items()
    ]
    secs = ", ".join(f"{k} {v:.2f} s" for k, v in s["assignment_seconds"].items())
    model_rows = "".join(f"<tr><th>{esc(k)}</th>{_share_cells(v, th)}{table_cell(v['n_b'], '{:d}')}</tr>"
                         for k, v in s["per_model"].items())  # fmt: skip
    parts = [
        f"""<header><h1>Concepts of two runs, matched</h1><div class="meta">A {esc(s["run_a"])} &middot;
B {esc(s["run_b"])} &middot; backbones {esc(", ".join(keys))} &middot; {s["concepts"]["a"]} / {s["concepts"]["b"]}
concepts &middot; member sets from A: {esc(s["membership"]["a"])}, B: {esc(s["membership"]["b"])}</div></header>""",
        f'<div class="cards">{"".join(cards)}</div>',
        "".join(f'<div class="warn">{esc(w)}</div>' for w in s["warnings"]),
        '<h2>Each model alone</h2><p class="meta">Hungarian assignment among the concepts that live in the '
        "model in each run (n: A's, n B: B's), on the cosine of their unit decoder rows.</p>"
        f"<table><thead><tr><th>model</th>{head}<th>n B</th></tr></thead><tbody>{model_rows}</tbody></table>",
    ]
    if j:
        rule = ("the mean over the models where both concepts live" if s["joint_rule"] == "members"
                else "the mean over every model")  # fmt: skip
        parts.append(f'<h2>Jointly</h2><p class="meta">Hungarian assignment among the live concepts of '
                     f"each run on the joint cosine, {rule}. Dead concepts are left out and counted. "
                     "same members: the partner lives in the same models.</p>")  # fmt: skip
        for side, name in (("a", "A"), ("b", "B")):
            d = j[side]
            rows = f"<tr><th>every live concept</th>{_share_cells(d['all_live'], th)}<td></td></tr>"
            rows += "".join(f"<tr><th>{esc(lab)}</th>{_share_cells(r, th)}{table_cell(r['same_members'])}</tr>"
                            for lab, r in d["by_members"].items())  # fmt: skip
            dec = "".join(f"<tr><th>{r['decile']}</th>{_share_cells(r, th)}{table_cell(r['importance_min'], '{:.3g}')}"
                          f"{table_cell(r['importance_max'], '{:.3g}')}</tr>" for r in d["by_importance_decile"])  # fmt: skip
            parts.append(
                f"<h3>Concepts of {name} ({d['live']} live, {d['dead']} dead)</h3>"
                f'<div class="figs"><table><thead><tr><th>lives in</th>{head}<th>same members</th></tr></thead>'
                f"<tbody>{rows}</tbody></table>"
                f"<table><thead><tr><th>importance decile</th>{head}<th>importance from</th><th>to</th></tr>"
                f"</thead><tbody>{dec}</tbody></table></div>"
            )
    figs = ['<img src="figures/cosine_histogram.png" alt="cosine_histogram">']
    if j:
        figs.insert(0, '<img src="figures/matched_by_decile.png" alt="matched_by_decile">')
    parts.append(f'<h2>Figures</h2><div class="figs">{"".join(figs)}</div>')
    parts.append(f'<p class="meta">Assignment time (scipy linear_sum_assignment): {esc(secs)}; '
                 f"whole comparison {s['seconds']:.1f} s. Pairs: pairs.parquet.</p>")  # fmt: skip
    index = out / "index.html"
    atomic_write(index, html_page("usae compare", "\n".join(parts)))
    return index
