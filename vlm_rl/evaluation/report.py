"""The comparison report: one self-contained ``report.html`` plus ``summary.json``.

`write_report` takes the output of `vlm_rl.evaluation.statistics.summarize`, the training curves of
`vlm_rl.evaluation.statistics.read_training_curves`, and a few sample rows, and writes:

- ``summary.json``: the summary, as given (JSON; NaN becomes null).
- ``report.html``: no external resources at all (inline CSS, images as base64 PNG data URIs,
  training curves as inline SVG drawn here, no JavaScript), so it can be mailed or archived.

Both files are written atomically (a temporary file in the same directory, then `os.replace`).
All text that comes from data (model names, prompts, responses, metric names) is escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_rl.atomic import atomic_file
from vlm_rl.evaluation.statistics import CURVE_METRICS

__all__ = ["write_report"]

#: Series colours (colour-blind friendly, in model order).
PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")

#: Chart title and y-axis label of the known training metrics.
METRIC_LABELS = {
    "objective/scores": ("Reward score", "score"),
    "eval/scores": ("Held-out reward, sampled", "score"),
    "eval/scores_greedy": ("Held-out reward, greedy", "score"),
    "eval/kl": ("Held-out KL to reference", "KL"),
    "objective/rlhf_reward": ("RLHF reward (score − KL penalty)", "reward"),
    "objective/kl": ("KL to reference", "KL"),
    "objective/entropy": ("Policy entropy", "entropy"),
    "loss/value_avg": ("Value loss", "loss"),
    "loss/policy_avg": ("Policy loss", "loss"),
}

THUMBNAIL_PX = 256  # stored thumbnail size (shown at half size: crisp on high-DPI screens)
MAX_CURVE_POINTS = 1500  # longer curves are thinned by stride to keep the file small

_CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --card:#ffffff;
        --pos:#1a7f37; --pos-bg:#dafbe1; --neg:#cf222e; --neg-bg:#ffebe9; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 14px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", "Helvetica Neue", Arial, "Noto Sans",
             "DejaVu Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 24px 48px; }
header { margin-bottom: 20px; }
h1 { font-size: 26px; margin: 0 0 4px; font-weight: 650; }
h2 { font-size: 18px; margin: 0 0 12px; font-weight: 600; }
h3 { font-size: 14px; margin: 0 0 6px; font-weight: 600; }
.sub { color: var(--muted); margin: 0; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 12px 0 0;
        font-size: 13px; }
.meta dt { color: var(--muted); }
.meta dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
           overflow-wrap: anywhere; }
section.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
               padding: 18px 20px; margin: 0 0 20px; }
.note { color: var(--muted); font-size: 12.5px; margin: 10px 0 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: var(--muted); font-weight: 600;
     background: var(--bg); white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.stats td { vertical-align: middle; }
.stats tbody tr:hover { background: #f3f6fa; }
.model { font-weight: 600; min-width: 90px; max-width: 320px; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 7px;
          vertical-align: baseline; }
.ci { color: var(--muted); font-size: 12.5px; }
.muted { color: var(--muted); }
.tag { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
       white-space: nowrap; }
.tag.pos { color: var(--pos); background: var(--pos-bg); }
.tag.neg { color: var(--neg); background: var(--neg-bg); }
.tag.na { color: var(--muted); background: var(--bg); }
tr.sig-pos td { background: #f0fbf3; }
tr.sig-neg td { background: #fff5f4; }
.wtl { display: flex; width: 120px; height: 8px; border-radius: 4px; overflow: hidden; background: var(--line);
       margin-top: 3px; }
.wtl span { display: block; height: 100%; }
.wtl .w { background: #2da44e; } .wtl .t { background: #afb8c1; } .wtl .l { background: #e5534b; }
.forest { position: relative; width: 220px; height: 18px; }
.forest .axis { position: absolute; top: 8px; left: 0; right: 0; height: 1px; background: var(--line); }
.forest .zero { position: absolute; top: 1px; width: 1px; height: 16px; background: var(--muted); }
.forest .bar { position: absolute; top: 5px; height: 7px; border-radius: 3px; background: #8c959f; min-width: 2px; }
.forest .bar.pos { background: #2da44e; } .forest .bar.neg { background: #e5534b; }
.forest .dot { position: absolute; top: 3px; width: 11px; height: 11px; margin-left: -5.5px; border-radius: 50%;
               background: var(--fg); border: 2px solid #fff; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 16px; }
figure.chart { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px 6px; }
figure.chart svg { display: block; width: 100%; height: auto; }
h3 .metric { display: block; color: var(--muted); font-weight: 400; font-size: 12px;
             font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.legend { font-size: 12px; color: var(--muted); margin: 0 0 4px; }
.legend span { margin-right: 12px; white-space: nowrap; }
table.samples { table-layout: fixed; }
table.samples td { padding: 12px 10px; }
table.samples tbody tr:nth-child(even) td { background: #fafbfc; }
td.idx { color: var(--muted); font-variant-numeric: tabular-nums; }
td.img img { display: block; max-width: 100%; max-height: 220px; width: auto; height: auto; border-radius: 4px; border: 1px solid var(--line);
             margin-bottom: 6px; background: #fff; }
.noimg { color: var(--muted); font-size: 12px; }
.prompt, .resp { white-space: pre-wrap; overflow-wrap: anywhere; }
.resp { max-height: 16em; overflow-y: auto; font-size: 13.5px; }
.turn { margin-top: .35em; } .turn .img img { display: block; max-width: 96px; height: auto; image-rendering: pixelated; border: 1px solid var(--line); border-radius: 4px; }
.ref { margin-top: 8px; font-size: 13px; }
.ref b { color: var(--muted); font-weight: 600; font-size: 11.5px; text-transform: uppercase; letter-spacing: .03em; }
.ref span { white-space: pre-wrap; overflow-wrap: anywhere; font-weight: 600; }
th.mcol { border-top: 3px solid var(--line); text-transform: none; letter-spacing: 0; font-size: 13px; color: var(--fg);
          overflow-wrap: anywhere; white-space: normal; }
.score { display: inline-block; font-size: 12px; font-variant-numeric: tabular-nums; padding: 0 7px;
         border-radius: 9px; background: var(--bg); border: 1px solid var(--line); margin-bottom: 5px; }
.score.best { background: var(--pos-bg); border-color: #a4e2b4; color: var(--pos); font-weight: 600; }
.score.none { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 8px; }
"""


# --------------------------------------------------------------------------------------------
# Small helpers


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any, digits: int = 3, sign: bool = False) -> str:
    """A number for a table cell; '—' for missing."""
    if not _is_num(x):
        return "—"
    x = float(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** (-digits)):
        s = f"{x:+.{digits}g}" if sign else f"{x:.{digits}g}"
    else:
        s = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return s.replace("-", "−")  # typographic minus


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _jsonable(x: Any) -> Any:
    """Plain JSON types (tuples -> lists, numpy scalars -> Python numbers, NaN/inf -> None)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item"):  # numpy / torch scalars
        return _jsonable(x.item())
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return str(x)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same directory + `os.replace`)."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def _png_data_uri(image: Any) -> str:
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            image = im.copy()
    im = image.copy()
    if im.mode not in ("RGB", "RGBA", "L", "LA"):
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# SVG line charts


def _nice_step(span: float, target_ticks: int) -> float:
    raw = span / max(1, target_ticks - 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw * (1 - 1e-9):
            return m * mag
    return 10 * mag


def _nice_ticks(lo: float, hi: float, target_ticks: int = 5, integer: bool = False) -> tuple[list[float], float]:
    """Round tick values covering [lo, hi] (the axis spans first to last tick) and the step."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target_ticks)
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    count = int(round((end - start) / step))
    return [start + i * step for i in range(count + 1)], step


def _fmt_tick(v: float, step: float) -> str:
    """A tick label with as many decimals as the tick step needs (0.25 -> 2, 5 -> 0)."""
    if abs(v) < step * 1e-9:
        v = 0.0
    if max(abs(v), step) >= 1e6 or step < 1e-4:
        s = f"{v:.3g}"
    elif step >= 1 and step == int(step):
        s = f"{v / 1000:g}k" if abs(v) >= 1e4 and (v / 1000) == int(v / 1000) else f"{v:.0f}"
    else:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        while decimals < 8 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
            decimals += 1
        s = f"{v:.{decimals}f}"
    return s.replace("-", "\u2212")


def _thin(points: Sequence[tuple[float, float]], limit: int = MAX_CURVE_POINTS) -> list[tuple[float, float]]:
    pts = [(float(s), float(v)) for s, v in points if _is_num(s) and _is_num(v)]
    if len(pts) <= limit:
        return pts
    stride = math.ceil(len(pts) / limit)
    thinned = pts[::stride]
    if thinned[-1] != pts[-1]:
        thinned.append(pts[-1])
    return thinned


def _svg_line_chart(
    series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]],
    title: str,
    y_label: str,
    x_label: str = "step",
    width: int = 400,
    height: int = 230,
) -> str:
    """An inline SVG line chart. ``series``: (label, colour, [(x, y), ...]) triples."""
    ml, mr, mt, mb = 58, 14, 10, 40
    pw, ph = width - ml - mr, height - mt - mb
    data = [(label, colour, _thin(pts)) for label, colour, pts in series]
    xs = [x for _, _, pts in data for x, _ in pts]
    ys = [y for _, _, pts in data for _, y in pts]
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    xticks, xstep = _nice_ticks(min(xs), max(xs), 6, integer=True)
    ypad = (max(ys) - min(ys)) * 0.04
    # Pad a little, but never across zero (a KL that starts at 0 keeps its axis at 0).
    ylo = min(ys) - ypad if min(ys) < 0 else max(0.0, min(ys) - ypad)
    yhi = max(ys) + ypad if max(ys) > 0 else min(0.0, max(ys) + ypad)
    yticks, ystep = _nice_ticks(ylo, yhi, 5)
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return mt + ph - (y - y0) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{_esc(title)}" font-family="inherit" font-size="12">',
        f"<title>{_esc(title)}</title>",
    ]
    # Grid and tick labels.
    for t in yticks:
        y = sy(t)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#eaeef2"/>')
        out.append(
            f'<text x="{ml - 7}" y="{y:.1f}" text-anchor="end" dominant-baseline="middle" fill="#656d76">'
            f"{_esc(_fmt_tick(t, ystep))}</text>"
        )
    for t in xticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 5}" stroke="#8c959f"/>')
        out.append(
            f'<text x="{x:.1f}" y="{mt + ph + 17}" text-anchor="middle" fill="#656d76">{_esc(_fmt_tick(t, xstep))}</text>'
        )
    # Axes.
    out.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#8c959f"/>')
    out.append(f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#8c959f"/>')
    if y0 < 0 < y1:
        out.append(
            f'<line x1="{ml}" y1="{sy(0):.1f}" x2="{ml + pw}" y2="{sy(0):.1f}" stroke="#afb8c1" stroke-dasharray="3 3"/>'
        )
    # Axis labels.
    out.append(
        f'<text x="{ml + pw / 2:.1f}" y="{height - 5}" text-anchor="middle" fill="#1f2328" font-size="12">'
        f"{_esc(x_label)}</text>"
    )
    out.append(
        f'<text transform="translate(14 {mt + ph / 2:.1f}) rotate(-90)" text-anchor="middle" fill="#1f2328" '
        f'font-size="12">{_esc(y_label)}</text>'
    )
    # Series.
    for label, colour, pts in data:
        if not pts:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
        out.append(
            f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round" '
            f'stroke-linecap="round"><title>{_esc(label)}</title></path>'
        )
        if len(pts) <= 40:
            for x, y in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{colour}"/>')
    out.append("</svg>")
    return "".join(out)


def _normalise_curves(
    curves: Mapping[str, Any] | None, model_names: Sequence[str]
) -> dict[str, list[tuple[str, str, list]]]:
    """``{metric: [(label, colour, points)]}`` from one run's curves or ``{run: curves}``."""
    if not curves:
        return {}
    per_run = all(isinstance(v, Mapping) for v in curves.values())
    runs: list[tuple[str, Mapping[str, Any]]] = list(curves.items()) if per_run else [("", curves)]
    names = list(model_names)
    by_metric: dict[str, list[tuple[str, str, list]]] = {}
    for j, (run, run_curves) in enumerate(runs):
        colour = _color(names.index(run)) if run in names else _color(j if per_run else 0)
        for metric, pts in run_curves.items():
            pts = list(pts or [])
            if pts:
                by_metric.setdefault(str(metric), []).append((str(run), colour, pts))
    known = [m for m in CURVE_METRICS if m in by_metric]
    return {m: by_metric[m] for m in known + sorted(set(by_metric) - set(known))}


# --------------------------------------------------------------------------------------------
# HTML sections


def _header(title: str, summary: Mapping[str, Any], model_names: Sequence[str], n_samples: int, meta) -> str:
    models = summary.get("models", {})
    n_prompts = max((m.get("n", 0) or 0 for m in models.values()), default=0)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    parts = [
        "<header>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">{len(model_names)} models on {n_prompts} prompts · baseline '
        f"<b>{_esc(model_names[0]) if model_names else '—'}</b> · {n_samples} sample rows shown · "
        f"generated {_esc(when)}</p>",
    ]
    if meta:
        parts.append('<dl class="meta">')
        for k, v in meta.items():
            if not isinstance(v, str):
                v = json.dumps(_jsonable(v), ensure_ascii=False)
            parts.append(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>")
        parts.append("</dl>")
    parts.append("</header>")
    return "".join(parts)


def _wtl_cell(m: Mapping[str, Any], baseline: bool) -> str:
    if baseline:
        return '<span class="muted">baseline</span>'
    w, t, l = (int(m.get(k) or 0) for k in ("win", "tie", "loss"))
    total = w + t + l
    bar = ""
    if total:
        bar = (
            f'<div class="wtl" title="win {w} / tie {t} / loss {l}">'
            f'<span class="w" style="width:{100 * w / total:.2f}%"></span>'
            f'<span class="t" style="width:{100 * t / total:.2f}%"></span>'
            f'<span class="l" style="width:{100 * l / total:.2f}%"></span></div>'
        )
    return f"{w} / {t} / {l}{bar}"


def _models_table(summary: Mapping[str, Any], model_names: Sequence[str]) -> str:
    models = summary.get("models", {})
    rows = []
    for i, name in enumerate(model_names):
        m = models.get(name, {})
        ci = m.get("ci95") or [None, None]
        n = m.get("n")
        unscored = m.get("n_unscored") or 0
        n_cell = _esc(n if n is not None else "—")
        if unscored:
            n_cell += f'<br><span class="ci">{int(unscored)} unscored</span>'
        eos = m.get("eos_rate")
        kl = m.get("kl_to_first")
        kl_cell = '<span class="muted">baseline</span>' if i == 0 else _fmt(kl, 4)
        rows.append(
            "<tr>"
            f'<td class="model"><span class="swatch" style="background:{_color(i)}"></span>{_esc(name)}</td>'
            f'<td class="num">{n_cell}</td>'
            f'<td class="num"><b>{_fmt(m.get("mean_reward"))}</b></td>'
            f'<td class="num ci">[{_fmt(ci[0])}, {_fmt(ci[1])}]</td>'
            f'<td class="num">{(f"{100 * eos:.1f}%") if _is_num(eos) else "—"}</td>'
            f'<td class="num">{_fmt(m.get("mean_length"), 1)}</td>'
            f'<td class="num">{kl_cell}</td>'
            f"<td>{_wtl_cell(m, i == 0)}</td>"
            "</tr>"
        )
    first = _esc(model_names[0]) if model_names else ""
    return (
        '<section class="card"><h2>Models</h2><div class="scroll"><table class="stats"><thead><tr>'
        '<th>Model</th><th class="num">Prompts</th><th class="num">Mean reward</th><th class="num">95% CI</th>'
        '<th class="num">EOS rate</th><th class="num">Mean length</th>'
        f'<th class="num">KL to {first}</th><th style="white-space:normal">Win / tie / loss vs {first}</th>'
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
        '<p class="note">Mean reward: the combined reward, averaged over scored prompts, with a 95% percentile '
        "bootstrap CI over prompts. Mean length in response tokens. EOS rate: share of responses that ended "
        f"with an end-of-sequence token. KL: mean per-token KL of each model's responses to {first}. "
        f"Win / tie / loss: per prompt, this model's reward against {first}'s.</p></section>"
    )


def _differences_table(summary: Mapping[str, Any], model_names: Sequence[str]) -> str:
    diffs = summary.get("differences", {})
    first = _esc(model_names[0]) if model_names else ""
    names = [(i, n) for i, n in enumerate(model_names) if n in diffs]
    if not names:
        return ""
    bounds = [
        abs(v)
        for _, n in names
        for v in [diffs[n].get("mean"), *(diffs[n].get("ci95") or [])]
        if _is_num(v)
    ]
    scale = max(bounds, default=0.0) or 1.0

    def pos(v: float) -> float:  # 0..100 %, zero in the middle
        return 50.0 + 46.0 * v / scale

    rows = []
    for i, name in names:
        d = diffs[name]
        mean = d.get("mean")
        lo, hi = (list(d.get("ci95") or []) + [None, None])[:2]
        cls, verdict, bar_cls = "", '<span class="tag na">no clear difference</span>', ""
        if _is_num(lo) and _is_num(hi):
            if lo > 0:
                cls, verdict, bar_cls = "sig-pos", '<span class="tag pos">better · CI above 0</span>', " pos"
            elif hi < 0:
                cls, verdict, bar_cls = "sig-neg", '<span class="tag neg">worse · CI below 0</span>', " neg"
        elif not _is_num(mean):
            verdict = '<span class="tag na">no scored pairs</span>'
        forest = ""
        if _is_num(lo) and _is_num(hi) and _is_num(mean):
            forest = (
                f'<div class="forest" title="[{_fmt(lo)}, {_fmt(hi)}]"><div class="axis"></div>'
                f'<div class="zero" style="left:{pos(0):.2f}%"></div>'
                f'<div class="bar{bar_cls}" style="left:{pos(lo):.2f}%;width:{pos(hi) - pos(lo):.2f}%"></div>'
                f'<div class="dot" style="left:{pos(mean):.2f}%"></div></div>'
            )
        rows.append(
            f'<tr class="{cls}">'
            f'<td class="model"><span class="swatch" style="background:{_color(i)}"></span>{_esc(name)}</td>'
            f'<td class="num"><b>{_fmt(mean, sign=True)}</b></td>'
            f'<td class="num ci">[{_fmt(lo, sign=True)}, {_fmt(hi, sign=True)}]</td>'
            f"<td>{forest}</td><td>{verdict}</td></tr>"
        )
    return (
        f'<section class="card"><h2>Difference in reward vs {first}</h2><div class="scroll"><table class="stats">'
        f'<thead><tr><th>Model</th><th class="num">Δ mean reward</th><th class="num">95% CI</th>'
        f"<th>CI (0 = {first})</th><th>Verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
        f'<p class="note">Paired by prompt: mean of (model − {first}) per-prompt reward differences, with a 95% '
        "bootstrap CI that resamples prompts. Highlighted when the whole CI lies above (green) or below (red) "
        "zero.</p></section>"
    )


def _curves_section(curves: Mapping[str, Any] | None, model_names: Sequence[str]) -> str:
    by_metric = _normalise_curves(curves, model_names)
    if not by_metric:
        return (
            '<section class="card"><h2>Training curves</h2>'
            '<p class="muted">No training logs found (no trainer_state.json in the run directories).</p></section>'
        )
    figures = []
    for metric, series in by_metric.items():
        title, y_label = METRIC_LABELS.get(metric, (metric, metric.rsplit("/", 1)[-1]))
        legend = ""
        if any(label for label, _, _ in series):
            legend = (
                '<p class="legend">'
                + "".join(
                    f'<span><span class="swatch" style="background:{c}"></span>{_esc(label)}</span>'
                    for label, c, _ in series
                )
                + "</p>"
            )
        figures.append(
            f'<figure class="chart"><h3>{_esc(title)}<span class="metric">{_esc(metric)}</span></h3>'
            f"{legend}{_svg_line_chart(series, f'{title} ({metric})', y_label)}</figure>"
        )
    return '<section class="card"><h2>Training curves</h2><div class="charts">' + "".join(figures) + "</div></section>"


def _image_cell(image: Any) -> str:
    images = image if isinstance(image, (list, tuple)) else ([] if image is None else [image])
    if not images:
        return '<span class="noimg">no image</span>'
    out = []
    for im in images:
        try:
            out.append(f'<img src="{_png_data_uri(im)}" alt="prompt image">')
        except Exception as e:  # a broken image must not lose the whole report
            out.append(f'<span class="noimg">image unavailable ({_esc(type(e).__name__)})</span>')
    return "".join(out)


def _turns(messages: Sequence[Mapping[str, Any]]) -> str:
    """A multi-turn answer: each model turn's text, and each observation's text and images, in order."""
    out = []
    for m in messages:
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        text = "".join(p.get("text") or "" for p in parts if p.get("type") == "text")
        images = [p["image"] for p in parts if p.get("type") == "image"]
        role = "model" if m.get("role") == "assistant" else m.get("name") or m.get("role", "")
        out.append(
            f'<div class="turn"><b>{_esc(role)}</b> <span class="resp">{_esc(text)}</span>'
            + (f'<div class="img">{_image_cell(images)}</div>' if images else "")
            + "</div>"
        )
    return "".join(out)


MAX_STRIP_FRAMES = 8


def filmstrip(frames: Sequence[Any], limit: int = MAX_STRIP_FRAMES, per_row: int = 4) -> Any:
    """A video's frames in one RGB image, in reading order, `per_row` to a row, 2 px apart on white; at most `limit`
    of them (evenly spaced, the first and the last kept)."""
    from PIL import Image

    if len(frames) > limit:
        frames = [frames[round(i * (len(frames) - 1) / (limit - 1))] for i in range(limit)]
    width, height = max(f.width for f in frames), max(f.height for f in frames)
    columns, rows = min(per_row, len(frames)), -(-len(frames) // per_row)
    strip = Image.new("RGB", (columns * (width + 2) - 2, rows * (height + 2) - 2), (255, 255, 255))
    for i, frame in enumerate(frames):
        strip.paste(frame.convert("RGB"), ((i % per_row) * (width + 2), (i // per_row) * (height + 2)))
    return strip


def _video_cell(frames: Sequence[Any] | None) -> str:
    """A prompt video as a strip of its frames (the report holds no video player: everything is inline PNG)."""
    if not frames:
        return ""
    try:
        shown = min(len(frames), MAX_STRIP_FRAMES)
        return (f'<img class="strip" src="{_png_data_uri(filmstrip(frames))}" alt="video frames">'
                f'<div class="muted">video: {len(frames)} frames{"" if shown == len(frames) else f" ({shown} shown)"}</div>')
    except Exception as e:  # a broken video must not lose the whole report
        return f'<span class="noimg">video unavailable ({_esc(type(e).__name__)})</span>'


def _media_cell(sample: Mapping[str, Any]) -> str:
    """The prompt's image(s), or its video's frames, or both."""
    video = _video_cell(sample.get("video"))
    if video and sample.get("image") is None:
        return video
    return _image_cell(sample.get("image")) + video


def _samples_section(samples: Sequence[Mapping[str, Any]], model_names: Sequence[str]) -> str:
    if not samples:
        return ""
    n_models = len(model_names)
    head = "".join(
        f'<th class="mcol" style="border-top-color:{_color(i)}">{_esc(name)}</th>' for i, name in enumerate(model_names)
    )
    rows = []
    for k, s in enumerate(samples):
        responses = s.get("responses") or {}
        rewards = [
            (responses.get(n) or {}).get("reward") for n in model_names if _is_num((responses.get(n) or {}).get("reward"))
        ]
        best = max(rewards) if len(rewards) > 1 and max(rewards) > min(rewards) else None
        cells = []
        for name in model_names:
            r = responses.get(name)
            if r is None:
                cells.append('<td><span class="muted">—</span></td>')
                continue
            reward = r.get("reward")
            if _is_num(reward):
                is_best = best is not None and abs(reward - best) <= 1e-9
                badge = f'<span class="score{" best" if is_best else ""}">score {_fmt(reward)}</span>'
            else:
                badge = '<span class="score none">unscored</span>'
            answer_html = _turns(r["turns"]) if r.get("turns") else f'<div class="resp">{_esc(r.get("text", ""))}</div>'
            cells.append(f"<td>{badge}{answer_html}</td>")
        answer = s.get("answer")
        ref = (
            f'<div class="ref"><b>Reference</b><br><span>{_esc(answer)}</span></div>'
            if answer is not None and str(answer) != ""
            else ""
        )
        rows.append(
            f'<tr><td class="idx">{k + 1}</td><td class="img">{_media_cell(s)}</td>'
            f'<td><div class="prompt">{_esc(s.get("prompt", ""))}</div>{ref}</td>' + "".join(cells) + "</tr>"
        )
    min_width = 40 + 150 + 240 + 180 * n_models
    return (
        f'<section class="card"><h2>Samples</h2><div class="scroll"><table class="samples" '
        f'style="min-width:{min_width}px"><colgroup><col style="width:40px"><col style="width:150px">'
        f'<col style="width:{26 if n_models <= 3 else 20}%">'
        + '<col>' * n_models
        + "</colgroup><thead><tr><th>#</th><th>Image</th><th>Prompt</th>"
        + head
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
        '<p class="note">Same prompt, seed and generation config for every model; the best score in a row is '
        "highlighted.</p></section>"
    )


# --------------------------------------------------------------------------------------------
# Public API


def write_report(
    out_dir: str | Path,
    summary: Mapping[str, Any],
    curves: Mapping[str, Any] | None,
    samples: Sequence[Mapping[str, Any]],
    model_names: Sequence[str],
    *,
    title: str = "Checkpoint comparison",
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.html`` and ``summary.json`` into ``out_dir`` (created if needed).

    - ``summary``: `vlm_rl.evaluation.statistics.summarize`'s output; written to ``summary.json`` as is.
    - ``curves``: one run's `read_training_curves` output ``{metric: [(step, value)]}``, or
      ``{run_or_model_name: {metric: [(step, value)]}}`` to overlay several runs (a run named like
      a model gets that model's colour); empty/None -> "no training logs found".
    - ``samples``: rows ``{"image": PIL.Image | list | None, "prompt": str, "answer": str | None,
      "responses": {model_name: {"text": str, "reward": float | None, "turns": [messages] (multi-turn only)}}}``, and
      ``"video"``: a list of frames (PIL), shown as a strip of frames.
    - ``model_names``: display order; the first is the baseline.
    - ``title`` and ``meta`` (e.g. data path, reward spec, generation config) go in the header.

    Returns the path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in model_names]

    summary_text = json.dumps(_jsonable(summary), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    body = "".join(
        [
            _header(title, summary, names, len(samples), meta),
            _models_table(summary, names),
            _differences_table(summary, names),
            _curves_section(curves, names),
            _samples_section(samples, names),
            "<footer>vlm-rl compare · summary.json holds these figures</footer>",
        ]
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )

    _atomic_write_text(out / "summary.json", summary_text)
    report = out / "report.html"
    _atomic_write_text(report, page)
    return report
