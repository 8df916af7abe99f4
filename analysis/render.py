"""A report directory's data -> its HTML pages: REPORT/metrics.json + concepts.parquet (+ the
figures, the top-image thumbnails REPORT/thumbs/<k>/ and any activation-maximisation panels)
-> index.html (summary, figures, the gallery of each member set's most important concepts,
the concept table) and concepts/<k>.html.

The render step of ``usae analyze`` and of ``usae maximize`` writing into a report: it reads
only files, never recomputes a metric, and imports neither the analysis computation nor
maximize. Panels are found at REPORT/maximize/<k>/panel.png, or in another folder of
`usae maximize` outputs (copied into REPORT/maximize so the report stays self-contained).
The pages embed their CSS and script and link only relative files: they work offline.
``print_summary`` renders the same metrics for the terminal.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from usae.runtime import atomic_write

FIGURES = ("r2_matrix", "firing_entropy", "cofire_proportion", "cofire_vs_importance")
"""REPORT/figures/<name>.png shown on the index page."""


def file_key(key: str) -> str:
    """A backbone key as part of a file name (characters outside [A-Za-z0-9._-] as _)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def thumb_file(k: int, n: int, key: str | None = None) -> str:
    """Path, relative to the report, of concept k's n-th top image thumbnail: the photo
    (``key`` None) or backbone ``key``'s token map over it."""
    if key is None:
        return f"thumbs/{k}/{n}.jpg"
    return f"thumbs/{k}/{n}_{file_key(key)}.jpg"


def page_concepts(m: dict) -> list[int]:
    """Concepts given a page with images: metrics.json's top concepts, then the gallery's."""
    top = m["top_concepts"]
    ks = list(dict.fromkeys(top["importance"] + top["universality"]))
    return ks + [k for g in m.get("gallery") or [] for k in g["concepts"] if k not in ks]


def render_report(report: str | Path, maximize: str | Path | None = None) -> Path:
    """Write REPORT/index.html and REPORT/concepts/<k>.html from the report's data; returns index.html.

    Pages: every concept shown in metrics.json's ``top_concepts`` and every concept with a
    maximisation panel (from ``maximize``, default REPORT/maximize). Old concept pages go.
    """
    out = Path(report)
    m = json.loads((out / "metrics.json").read_text())
    df = pd.read_parquet(out / "concepts.parquet")
    keys = list(m["backbones"])
    shown = page_concepts(m)
    maxi = maximize_panels(out, Path(maximize) if maximize else out / "maximize")
    pages = sorted(set(shown) | set(maxi))
    (out / "concepts").mkdir(parents=True, exist_ok=True)
    for old in (out / "concepts").glob("*.html"):
        if not old.stem.isdigit() or int(old.stem) not in pages:
            old.unlink()
    for n, k in enumerate(pages):
        nav = (pages[n - 1] if n else None, pages[n + 1] if n + 1 < len(pages) else None)
        tops = m["top_images"].get(str(k), [])
        body = _concept_body(k, keys, df.iloc[k], tops, maxi.get(k), nav, out, m.get("photos"))
        atomic_write(out / "concepts" / f"{k}.html", html_page(f"concept {k}", body))
    index = out / "index.html"
    atomic_write(
        index, html_page("usae report", _index_body(keys, df, m, set(pages), out), script=True)
    )
    return index


def maximize_panels(out: Path, src: Path) -> dict[int, str]:
    """concept -> path (relative to the report) of its maximisation panel, copied into REPORT/maximize."""
    found: dict[int, str] = {}
    if not src.is_dir():
        return found
    for d in sorted(src.iterdir()):
        if d.is_dir() and d.name.isdigit() and (d / "panel.png").is_file():
            dst = out / "maximize" / d.name / "panel.png"
            if dst.resolve() != (d / "panel.png").resolve():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / "panel.png", dst)
            found[int(d.name)] = f"maximize/{d.name}/panel.png"
    return found


# ---------------------------------------------------------------- HTML
def _asset(name: str) -> str:
    return resources.files("usae.analysis").joinpath(name).read_text(encoding="utf-8")


def html_page(title: str, body: str, script: bool = False) -> str:
    js = f"<script>\n{_asset('report.js')}\n</script>" if script else ""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>\n{_asset('report.css')}\n</style></head>\n"
        f"<body>\n{body}\n{js}\n</body></html>\n"
    )


def table_cell(v: Any, fmt: str = "{:.3f}", link: str | None = None) -> str:
    """A table cell with its sort key in data-v (empty when missing)."""
    if v is None or (isinstance(v, float | np.floating) and not np.isfinite(v)):
        return '<td data-v="">n/a</td>'
    text = fmt.format(v)
    if link:
        text = f'<a href="{link}">{text}</a>'
    return f'<td data-v="{v}">{text}</td>'


def summary_card(value: str, label: str) -> str:
    return f'<div class="card"><div class="v">{html.escape(value)}</div><div class="l">{html.escape(label)}</div></div>'


def _index_body(keys: Sequence[str], df: pd.DataFrame, m: dict, pages: set[int], out: Path) -> str:
    esc = html.escape
    fe, corr = m["firing_entropy"], m["cofire_vs_importance"]
    cards = [summary_card(fmt_value(m["r2_self"][k]), f"R2 {k} (self)") for k in keys]
    cards += [summary_card(fmt_value(m["l0"][k], 1), f"L0 {k}") for k in keys]
    cards += [
        summary_card(f"{m['dead']} / {m['concepts']}", "dead concepts"),
        summary_card(fmt_value(fe.get("mean")), "mean firing entropy"),
        summary_card(fmt_value(corr["all"]["r"], 2), "r(log co-fires, log energy)"),
        summary_card(fmt_value(corr["cofires_ge_1000"]["r"], 2), "same, >= 1000 co-fires"),
    ]
    mem = m.get("membership")
    if mem:
        cards.append(
            summary_card(f"{mem['in_all']} / {m['concepts']}", "concepts in all backbones")
        )
        cards.append(summary_card(str(len(mem["duplicate_pairs"])), "duplicated concepts (pairs)"))
    for k, v in (m["baseline_matching"] or {}).items():
        cards.append(
            summary_card(fmt_value(v["all"]["share_matched"]), f"{k}: share matched at cos > 0.5")
        )
    warn = "".join(f'<div class="warn">{esc(w)}</div>' for w in m["warnings"])
    if m["image_failures"]:
        items = "".join(
            f"<li>{esc(f['image_id'])}: {esc(f['reason'])}</li>" for f in m["image_failures"]
        )
        warn += f'<div class="warn">Top images that could not be loaded (placeholders shown):<ul>{items}</ul></div>'
    r2 = "".join(
        f"<tr><th>{esc(k)}</th>" + "".join(table_cell(v) for v in m["r2"][i]) + "</tr>"
        for i, k in enumerate(keys)
    )
    r2_table = f"<table><thead><tr><th>codes from \\ R2 of</th>{''.join(f'<th>{esc(k)}</th>' for k in keys)}</tr></thead><tbody>{r2}</tbody></table>"
    figs = "".join(f'<img src="figures/{f}.png" alt="{f}">' for f in FIGURES)
    layers = _layer_section(m.get("layer_alignment")) + _labels_section(
        m.get("labels"), keys, pages
    )
    return f"""<header><h1>USAE report</h1>
<div class="meta">run {esc(m["run"])} &middot; store {esc(m["store"])} &middot; {m["n_images"]} images ({esc(m["images"])}),
{m["n_tokens"]} tokens &middot; {m["concepts"]} concepts, k = {m["k"]} &middot; tau = {m["tau"]}{" &middot; independent SAEs" if m["independent"] else ""}
{" &middot; " + esc(_trained(m)) if m.get("training") else ""}</div></header>
<div class="cards">{"".join(cards)}</div>{warn}
{_gallery(keys, df, m, out)}
<h2>Cross-model reconstruction (R2, scalar mean)</h2>{r2_table}{layers}
<h2>Figures</h2><div class="figs">{figs}</div>
<h2>Concepts</h2><div class="controls">Click a column to sort. Concepts with a page are linked.
<label><input type="checkbox" id="hide-dead"> hide dead concepts</label></div>
<div class="scroll">{_concept_table(keys, df, pages)}</div>"""


# ---------------------------------------------------------------- thumbnails and gallery
def _photos_note(m: dict) -> str:
    """Why there are no photos (metrics.json ``photos`` False), or ""."""
    if m.get("photos", True):
        return ""
    return (
        '<div class="note">Photos unavailable (the store records no manifest, or it moved; '
        "pass <code>--manifest</code>): token maps are drawn on blank squares.</div>"
    )


def thumb_img(out: Path, rel: str, alt: str, prefix: str = "", cls: str = "") -> str:
    """An <img> of a thumbnail, or a blank placeholder square when the file is missing."""
    c = f' class="{cls}"' if cls else ""
    if (out / rel).is_file():
        return f'<img{c} src="{prefix}{rel}" alt="{html.escape(alt)}" width="128" height="128">'
    return f'<span class="blank{(" " + cls) if cls else ""}" title="{html.escape(alt)}">photo unavailable</span>'


def _label_text(row: pd.Series) -> str:
    """A concept's manifest label as text, "label (67%)" with its share, or "" (none)."""
    label = str(row["label_top"]) if "label_top" in row and row["label_top"] is not None else ""
    if not label or label == "nan":
        return ""
    share = row.get("label_share")
    if share is not None and isinstance(share, float | np.floating) and np.isfinite(share):
        return f"{label} ({float(share):.0%})"
    return label


def _gallery(keys: Sequence[str], df: pd.DataFrame, m: dict, out: Path) -> str:
    """The gallery: per member set, a card per concept (top image, its token map per backbone,
    the next top photos, label, lives-in badge), each linked to the concept's page."""
    sets = m.get("gallery") or []
    if not sets:
        return ""
    counts = df["members"].value_counts() if "members" in df.columns else pd.Series(dtype=int)
    parts, empty = [], []
    for g in sets:
        lab = g["members"]
        title = "in all backbones" if lab == "all" else f"in {lab} only"
        if not g["concepts"]:
            empty.append(title)
            continue
        n_all = int(counts.get(lab, 0))
        cards = "".join(_gallery_card(k, keys, df.iloc[k], m, out) for k in g["concepts"])
        count = (
            f"{n_all} concept{'s' if n_all != 1 else ''}, top {len(g['concepts'])} by importance"
        )
        parts.append(
            f'<section class="gset" data-members="{html.escape(lab)}"><h3>{html.escape(title)} '
            f'<span class="count">{count}</span></h3><div class="gallery">{cards}</div></section>'
        )
    if empty:
        parts.append(f'<p class="lede">No concept lives {html.escape(", ".join(empty))}.</p>')
    legend = (
        '<p class="lede">The most important concepts of each set of backbones they live in. '
        "Each card: the top activating image, then the concept's code on each token for every "
        "backbone (one colour scale per image; brighter is stronger), then the next top "
        "images. Click a card for the concept's page.</p>"
    )
    return f'\n<h2 id="gallery">Gallery</h2>{legend}{_photos_note(m)}{"".join(parts)}'


def _gallery_card(k: int, keys: Sequence[str], row: pd.Series, m: dict, out: Path) -> str:
    esc = html.escape
    tops = m["top_images"].get(str(k), [])
    members = str(row["members"]) if "members" in row else ""
    badge = f'<span class="badge">{esc(members)}</span>' if members else ""
    label = _label_text(row)
    head = f'<div class="ghead"><span class="gk">#{k}</span>{badge}</div>' + (
        f'<div class="glabel" title="manifest label">{esc(label)}</div>' if label else ""
    )
    if not tops:
        return f'<a class="gcard" href="concepts/{k}.html">{head}<p class="meta">no activating image</p></a>'
    photos = m.get("photos", True)
    first = thumb_img(out, thumb_file(k, 0), f"top image {tops[0]['image_id']}")
    heats = "".join(
        f"<figure>{thumb_img(out, thumb_file(k, 0, key), f'{key} token map')}"
        f"<figcaption>{esc(key)}</figcaption></figure>"
        for key in keys
    )
    main = f"<figure>{first}<figcaption>top image</figcaption></figure>{heats}"
    strip = (
        "".join(
            thumb_img(out, thumb_file(k, n), f"top image {t['image_id']}", cls="small")
            for n, t in enumerate(tops[1:], start=1)
        )
        if photos
        else ""
    )
    imp = f"importance {_py(row['importance']):.3g} &middot; rank #{int(row['importance_rank'])}"
    return (
        f'<a class="gcard" href="concepts/{k}.html">{head}<div class="gmain">{main}</div>'
        + (f'<div class="gstrip">{strip}</div>' if strip else "")
        + f'<div class="gfoot">{imp}</div></a>'
    )


def _concept_thumbs(k: int, keys: Sequence[str], tops: list[dict], out: Path, photos: bool) -> str:
    """The concept page's top images: a row per image, its photo then each backbone's map."""
    esc = html.escape
    head = ("<th>photo</th>" if photos else "") + "".join(f"<th>{esc(key)}</th>" for key in keys)
    rows = []
    for n, t in enumerate(tops):
        iid = t["image_id"]
        why = f'<div class="why">{esc(t["failure"])}</div>' if t.get("failure") else ""
        cells = (
            f"<td>{thumb_img(out, thumb_file(k, n), f'image {iid}', '../')}</td>" if photos else ""
        )
        cells += "".join(
            f"<td>{thumb_img(out, thumb_file(k, n, key), f'{key} token map of {iid}', '../')}</td>"
            for key in keys
        )
        rows.append(
            f'<tr><th class="tid">{esc(t["image_id"])}<div class="meta">score {t["score"]:.3g}</div>{why}</th>{cells}</tr>'
        )
    return (
        f'<table class="thumbs"><thead><tr><th>image</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _layer_section(entry: dict | None) -> str:
    """The layer-alignment section (empty without metrics.json's ``layer_alignment``): the
    shared-concept heatmap beside the R2 matrix, and the best depth of each other model."""
    if not entry:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><th>{esc(b['key_a'])}</th><td>{esc(b['model_b'])}</td>"
        f"<td>{esc(b['key_b']) if b['key_b'] is not None else 'none shared'}</td>"
        f"{table_cell(b['shared'], '{:d}')}</tr>"
        for b in entry["best"]
    )
    table = (
        '<table id="layer-best"><thead><tr><th>group</th><th>other model</th>'
        f"<th>depth sharing most</th><th>shared concepts</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    return f"""
<h2 id="layer-alignment">Layer alignment</h2>
<p class="meta">Concepts shared by every two (model, layer) groups: concept k is shared by i and j
when it fires &ge; {entry["min_fires"]} times for each and co-fires(i, j) / min(fires i, fires j)
&ge; {entry["threshold"]:g}. Diagonal: concepts firing &ge; {entry["min_fires"]} times for that group.</p>
<div class="figs"><img src="figures/layer_alignment.png" alt="layer_alignment">
<img src="figures/r2_matrix.png" alt="r2_matrix beside layer_alignment"></div>
{table}"""


def _labels_section(entry: dict | None, keys: Sequence[str], pages: set[int]) -> str:
    """The labels section (empty without metrics.json's ``labels``): per label, the best single
    concept of each backbone as a detector, its held-out AUROC and the k-sparse probes."""
    if not entry or not entry.get("per_label"):
        return ""
    esc = html.escape
    ks = [str(k) for k in entry["ks"]]
    head = "<th>label</th><th>images</th>" + "".join(
        f"<th>{esc(k)}: best concept</th><th>{esc(k)}: AUROC</th>"
        + "".join(f"<th>{esc(k)}: {q}-sparse probe</th>" for q in ks)
        for k in keys
    )
    rows = []
    for e in entry["per_label"]:
        cells = f"<td>{esc(e['label'])}</td>{table_cell(e['n_images'], '{:d}')}"
        for k in keys:
            r = e["models"].get(k)
            if r is None:
                cells += '<td data-v="">n/a</td>' * (2 + len(ks))
                continue
            c = r["best_concept"]
            cells += table_cell(
                c, "{:d}", f"concepts/{c}.html" if c in pages else None
            ) + table_cell(r["auroc"])
            cells += "".join(table_cell(r["probe"][q]["balanced_accuracy"]) for q in ks)
        rows.append(f"<tr>{cells}</tr>")
    sampled = f" (a sample of the {entry['n_labelled']} labelled)" if entry["sampled"] else ""
    return f"""
<h2 id="labels">Labels</h2>
<p class="meta">Which concept detects each {esc(entry["column"])} (from the {esc(entry["source"])}):
per backbone, the concept whose per-image max code best separates the label from the others,
chosen on {entry["train_images"]} probe training images and scored (AUROC, chance 0.5) on
{entry["test_images"]} held-out images{sampled}; the k-sparse probes are logistic regressions
on the k concepts with the largest t statistic (balanced accuracy on the held-out images,
chance 0.5).</p>
<div class="scroll"><table class="sortable" id="labels-table"><thead><tr>{head}</tr></thead>
<tbody>{"".join(rows)}</tbody></table></div>"""


def _concept_table(keys: Sequence[str], df: pd.DataFrame, pages: set[int]) -> str:
    cols = [
        ("importance", "{:.4g}"),
        ("importance_rank", "{:d}"),
        ("firing_entropy", "{:.3f}"),
        ("cofires", "{:d}"),
        ("cofire_iou", "{:.3f}"),
    ]
    cols += [
        (f"{p}_{k}", f)
        for p, f in (("fires", "{:d}"), ("cfp", "{:.3f}"), ("energy", "{:.4g}"))
        for k in keys
    ]
    cols += [(c, "{:.3f}") for c in df.columns if c.startswith("match_cosine_")]
    has_members = "members" in df.columns
    head = "<th>concept</th>" + ("<th>lives in</th>" if has_members else "")
    head += "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    data = {c: df[c].to_numpy() for c, _ in cols}
    rows = []
    for r in range(len(df)):
        k = int(df["concept"].iat[r])
        cells = table_cell(k, "{:d}", f"concepts/{k}.html" if k in pages else None)
        members = str(df["members"].iat[r]) if has_members else ""
        if has_members:
            cells += f"<td>{html.escape(members or '-')}</td>"
        cells += "".join(table_cell(_py(data[c][r]), f) for c, f in cols)
        attrs = (
            " class=dead" if df["dead"].iat[r] else ""
        ) + f' data-members="{html.escape(members)}"'
        rows.append(f"<tr{attrs}>{cells}</tr>")
    table = f'<table class="sortable" id="concepts"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return _member_filter(df) + table


def _member_filter(df: pd.DataFrame) -> str:
    """A select that shows only the concepts living in one member set ("all", "a+b", ...)."""
    if "members" not in df.columns:
        return ""
    counts = df.loc[df["members"] != "", "members"].value_counts()
    opts = '<option value="">every concept</option>' + "".join(
        f'<option value="{html.escape(str(k))}">in {html.escape(str(k))} only ({int(v)})</option>'
        if k != "all"
        else f'<option value="all">in all backbones ({int(v)})</option>'
        for k, v in counts.items()
    )
    return f'<label class="filter">lives in <select id="member-filter">{opts}</select></label>'


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _concept_body(
    k: int, keys, row: pd.Series, tops: list[dict], maxi: str | None, nav, out: Path, photos
) -> str:
    """One concept's page; ``tops``: its top images as metrics.json records them."""
    esc = html.escape
    links = '<a href="../index.html">&larr; all concepts</a>'
    links += f'<a href="{nav[0]}.html">previous ({nav[0]})</a>' if nav[0] is not None else ""
    links += f'<a href="{nav[1]}.html">next ({nav[1]})</a>' if nav[1] is not None else ""
    stats = "".join(
        f"<tr><th>{esc(k_)}</th>{table_cell(_py(row[f'fires_{k_}']), '{:d}')}{table_cell(_py(row[f'cfp_{k_}']))}"
        f"{table_cell(_py(row[f'energy_{k_}']), '{:.4g}')}"
        + (table_cell(_py(row[f"match_cosine_{k_}"])) if f"match_cosine_{k_}" in row else "")
        + "</tr>"
        for k_ in keys
    )
    mhead = "<th>matched cosine (independent SAE)</th>" if f"match_cosine_{keys[0]}" in row else ""
    cards = [
        summary_card(fmt_value(_py(row["firing_entropy"])), "firing entropy"),
        summary_card(str(int(row["cofires"])), "co-fires"),
        summary_card(fmt_value(_py(row["cofire_iou"])), "co-fire IoU"),
        summary_card(f"{_py(row['importance']):.4g}", "importance"),
        summary_card(f"#{int(row['importance_rank'])}", "importance rank"),
    ]
    if _label_text(row):
        cards.insert(0, summary_card(_label_text(row), "manifest label (share of top images)"))
    if str(row.get("labels_top", "") or ""):
        cards.append(summary_card(str(row["labels_top"]), "labels of its top images"))
    if "members" in row:
        cards.insert(0, summary_card(str(row["members"]) or "-", "lives in"))
        if int(row["duplicate_of"]) >= 0:
            cards.append(
                summary_card(f"#{int(row['duplicate_of'])}", "same direction as (duplicate)")
            )
    parts = [
        f"<nav>{links}</nav><h1>Concept {k}</h1>",
        f'<div class="cards">{"".join(cards)}</div>',
        f"<table><thead><tr><th>backbone</th><th>fires</th><th>co-fire proportion</th><th>energy</th>{mhead}</tr></thead>"
        f"<tbody>{stats}</tbody></table>",
    ]
    photos = photos is None or bool(photos)  # reports before the record: as their files say
    if tops and not (out / "thumbs" / str(k)).is_dir() and (out / "images" / f"{k}.png").is_file():
        parts.append(  # a report analysed before thumbnails: its top-image panel
            f'<h2>Top images and token maps per backbone</h2><div class="panel">'
            f'<img src="../images/{k}.png" alt="top images of concept {k}"></div>'
        )
    elif tops:
        note = _photos_note({"photos": photos})
        parts.append(
            "<h2>Top images and token maps per backbone</h2>"
            '<p class="lede">Each row: a top activating image (score: its '
            "max or mean token code), then the concept's code on each token for every backbone "
            f"(one colour scale per row; brighter is stronger).</p>{note}"
            f"{_concept_thumbs(k, keys, tops, out, photos)}"
        )
    else:
        parts.append(
            "<h2>Top images</h2><p>This concept has no activating image in the evaluated set.</p>"
        )
    if maxi:
        parts.append(
            f'<h2>Activation maximisation</h2><div class="panel"><img src="../{maxi}" alt="activation maximisation of concept {k}"></div>'
        )
    return "\n".join(parts)


# ---------------------------------------------------------------- terminal
def _trained(m: dict) -> str:
    """One line on how the run was trained ("" for metrics without it)."""
    t = m.get("training")
    if not t:
        return ""
    steps = f", {t['steps']} steps" if t.get("steps") is not None else ""
    return f"trained: recipe {t['recipe']}, mode {t['mode']}, init {t['init']}{steps}"


def print_summary(m: dict) -> None:
    from rich.console import Console

    from usae.runtime import matrix_table

    keys = m["backbones"]
    title = f"usae analyze: {m['n_images']} images ({m['images']}), {m['n_tokens']} tokens"
    tab = matrix_table(
        title, "codes from \\ R2 of", keys, m["r2"], {"L0": [fmt_value(m["l0"][k]) for k in keys]}
    )
    con = Console()
    con.print(tab)
    if m.get("training"):
        con.print(_trained(m), highlight=False)
    c = m["cofire_vs_importance"]
    fe = m["firing_entropy"]
    con.print(
        f"dead {m['dead']}/{m['concepts']}; firing entropy mean {fmt_value(fe.get('mean'))}, "
        f"share > 0.9 {fmt_value(fe.get('share_above_0.9'))}; co-fire vs importance r {fmt_value(c['all']['r'])} "
        f"(>= 1000 co-fires: {fmt_value(c['cofires_ge_1000']['r'])})",
        highlight=False,
    )
    mem = m.get("membership")
    if mem:
        sets = ", ".join(f"{k} {v}" for k, v in mem["by_set"].items())
        con.print(
            f"lives in ({mem['rule']} rule): {sets}; duplicated pairs {len(mem['duplicate_pairs'])}",
            highlight=False,
        )
    lines: dict[tuple[str, str], list[str]] = {}
    for b in (m.get("layer_alignment") or {}).get("best", []):
        if b["model_a"] != b["model_b"]:
            best = f"{b['key_b']} ({b['shared']})" if b["key_b"] is not None else "none"
            lines.setdefault((b["model_a"], b["model_b"]), []).append(f"{b['key_a']} ~ {best}")
    for (a, b), items in lines.items():
        con.print(f"layer alignment {a} -> {b}: {', '.join(items)}", highlight=False)
    lab = m.get("labels")
    if lab and lab.get("summary"):
        parts = [
            f"{k} AUROC {fmt_value(v['mean_auroc'])}, "
            + ", ".join(
                f"{q}-sparse {fmt_value(a)}" for q, a in v["mean_balanced_accuracy"].items()
            )
            for k, v in lab["summary"].items()
        ]
        con.print(
            f"labels ({lab['column']}, {lab['n_classes']} classes, {lab['test_images']} held-out "
            f"probe images), mean over labels: {'; '.join(parts)}",
            highlight=False,
        )
    if m["baseline_matching"]:
        for k, v in m["baseline_matching"].items():
            con.print(
                f"baseline {k}: matched at cos > 0.5 {fmt_value(v['all']['share_matched'])}, "
                f"mean cosine {fmt_value(v['all']['mean_cosine'])}",
                highlight=False,
            )
    for w in m["warnings"]:
        con.print(f"warning: {w}", style="yellow", markup=False, highlight=False)
    if m["image_failures"]:
        con.print(
            f"{len(m['image_failures'])} top images could not be loaded (placeholders shown)",
            style="yellow",
        )


def fmt_value(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)
