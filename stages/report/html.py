"""The report page: one HTML file with its CSS, images (base64 PNG data URIs) and script inline, so it
opens from disk, offline, and can be mailed as one file."""

from __future__ import annotations

import base64
import html
import unicodedata
from dataclasses import dataclass, field

from stages.report.compare import format_value, grouped_rows
from stages.report.latents import ContextView, LatentBrowser, LatentView
from stages.report.runs import EvaluatedRun


@dataclass
class Image:
    filename: str  # also written beside index.html
    png: bytes
    alt: str


@dataclass
class Page:
    runs: list[EvaluatedRun]
    generated: str
    training: Image | None
    densities: list[Image]
    frontiers: list[Image]
    browsers: list[tuple[EvaluatedRun, LatentBrowser, dict[int, Image]]]  # run, browser, latent -> histogram
    notes: dict[str, list[str]] = field(default_factory=dict)  # section id -> notes


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 0 20px 60px; color: #222; }
h1 { margin: 18px 0 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 3px; margin-top: 34px; }
h3 { margin-top: 26px; } h4 { margin: 0 0 4px; }
.meta, .note { color: #666; } .note { font-style: italic; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 6px 0 14px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child { text-align: left; }
table.runs td { text-align: left; word-break: break-word; max-width: 320px; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
.figures img, .latent img { border: 1px solid #eee; max-width: 100%; }
.latent { border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; margin: 12px 0; }
.tag { background: #eef; border-radius: 4px; padding: 1px 6px; font-size: 12px; font-weight: normal; margin-left: 6px; }
.latent-top { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
table.logits td { font-family: ui-monospace, monospace; font-size: 12px; }
.context { font-family: ui-monospace, monospace; font-size: 12.5px; white-space: pre-wrap; word-break: break-all;
           border-top: 1px solid #f0f0f0; padding: 3px 0; }
.ctx-meta { color: #888; font-size: 11px; margin-right: 8px; }
.tok { border-radius: 2px; }
.tok.peak { outline: 1px solid #c40; }
.tok.unstored { color: #999; }
.cut { color: #aaa; }
.banner { background: #fdd; border: 2px solid #c00; color: #900; padding: 8px 12px; margin: 10px 0; font-weight: 600; }
"""

# Runs after load: every image decoded, and the latent browser shows at least one context. The result
# goes to <body data-check> (the tests read it) and, when something failed, into a visible banner.
CHECK_SCRIPT = """
var scriptErrors = [];
window.addEventListener("error", function (e) {
  scriptErrors.push(e.message || ("could not load " + ((e.target && e.target.alt) || "a resource")));
}, true);
window.addEventListener("load", function () {
  var problems = scriptErrors.slice();
  var images = Array.prototype.slice.call(document.images);
  if (images.length === 0) problems.push("the page has no images");
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  if (broken.length) problems.push(broken.length + " of " + images.length + " images did not load ("
    + broken.map(function (img) { return img.alt; }).join(", ") + ")");
  var latents = document.querySelectorAll("section.latent");
  var shown = Array.prototype.filter.call(latents, function (s) { return s.querySelector(".context"); });
  if (latents.length === 0) problems.push("the latent browser has no latent");
  else if (shown.length === 0) problems.push("no latent in the browser has a context");
  var result = problems.length ? problems.join("; ") : "ok";
  document.body.dataset.check = result;
  if (result !== "ok") {
    var banner = document.getElementById("check-banner");
    banner.textContent = "This report is incomplete: " + result;
    banner.hidden = false;
  }
});
"""

SHADE = (255, 120, 0)  # activation colour; alpha is the activation over the latent's max


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def img(image: Image, width: int | None = None) -> str:
    data = base64.b64encode(image.png).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{esc(image.alt)}" title="{esc(image.filename)}"{size}>'


def notes_html(notes: list[str]) -> str:
    return "".join(f'<p class="note">{esc(note)}</p>' for note in notes)


def runs_table(page: Page) -> str:
    browsed = {run.label: browser for run, browser, _ in page.browsers}
    head = ["run", "folder", "arch", "d_sae", "k", "hook", "model", "eval rows", "rows scanned for latents"]
    rows = []
    for run in page.runs:
        sae = run.sae_config
        browser = browsed.get(run.label)
        cells = [
            run.label,
            run.path,
            sae.get("arch"),
            sae.get("d_sae"),
            sae.get("k"),
            run.eval.get("hook"),
            run.eval.get("model", "-"),
            run.eval.get("eval_rows"),
            browser.scanned_rows if browser else None,
        ]
        rows.append("<tr>" + "".join(f"<td>{esc(format_value(c))}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<table class="runs"><tr>{header}</tr>{"".join(rows)}</table>'


def metric_tables(runs: list[EvaluatedRun]) -> str:
    out = []
    header = "<tr><th>metric</th>" + "".join(f"<th>{esc(run.label)}</th>" for run in runs) + "</tr>"
    for group, rows in grouped_rows(runs):
        body = "".join(
            f"<tr><td>{esc(key)}</td>" + "".join(f"<td>{esc(format_value(v))}</td>" for v in values) + "</tr>"
            for key, values in rows
        )
        out.append(f"<table><caption>{esc(group)}</caption>{header}{body}</table>")
    return "".join(out)


def token_span(span, peak: bool, max_activation: float) -> str:
    text = esc(display_token(span.text))
    if span.activation is None:
        return f'<span class="tok unstored" title="not stored">{text}</span>'
    alpha = min(max(span.activation / max_activation, 0.0), 1.0) if max_activation > 0 else 0.0
    style = f' style="background:rgba({SHADE[0]},{SHADE[1]},{SHADE[2]},{alpha:.2f})"' if alpha > 0 else ""
    cls = "tok peak" if peak else "tok"
    return f'<span class="{cls}"{style} title="{span.activation:.4g}">{text}</span>'


def context_html(view: ContextView, max_activation: float) -> str:
    spans = "".join(
        token_span(span, view.first_position + i == view.peak_position, max_activation)
        for i, span in enumerate(view.tokens)
    )
    left = '<span class="cut">…</span>' if view.cut_left else ""
    right = '<span class="cut">…</span>' if view.cut_right else ""
    return (
        f'<div class="context"><span class="ctx-meta">context {view.context} · peak {view.peak:.3g} '
        f"at {view.peak_position}</span>{left}{spans}{right}</div>"
    )


def logit_table(latent: LatentView) -> str:
    if not latent.promoted:
        return ""
    cell = lambda token, value: f"<td>{esc(display_token(token, True))}</td><td>{value:+.3g}</td>"  # noqa: E731
    rows = "".join(
        f"<tr>{cell(*promoted)}{cell(*suppressed)}</tr>"
        for promoted, suppressed in zip(latent.promoted, latent.suppressed)
    )
    return (
        '<table class="logits"><tr><th colspan="2">promoted tokens</th><th colspan="2">suppressed tokens</th></tr>'
        f"{rows}</table>"
    )


def display_token(token: str, show_spaces: bool = False) -> str:
    """Newlines and tabs as arrows and other control characters as escapes, so every token is visible;
    spaces as ␣ where a token stands alone (the output-token tables)."""
    out = []
    for char in token:
        if char == "\n":
            out.append("↵")
        elif char == "\t":
            out.append("⇥")
        elif char == " " and show_spaces:
            out.append("␣")
        elif unicodedata.category(char) == "Cc":
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def latent_html(run: EvaluatedRun, browser: LatentBrowser, latent: LatentView, histogram: Image | None) -> str:
    tags = "".join(f'<span class="tag">{esc(reason)}</span>' for reason in latent.reasons)
    density = "-" if latent.density is None else f"{latent.density:.3g}"
    stats = (
        f"firing fraction {density} · fired on {latent.fired:,} of {browser.scanned_rows:,} scanned rows · "
        f"max activation {latent.max_activation:.4g}"
    )
    contexts = "".join(context_html(view, latent.max_activation) for view in latent.contexts)
    if not contexts:
        contexts = '<p class="note">never fired on the scanned rows</p>'
    picture = img(histogram) if histogram is not None else ""
    return (
        f'<section class="latent" id="{esc(run.slug)}-latent-{latent.latent}">'
        f'<h4>latent {latent.latent}{tags}</h4><p class="meta">{stats}</p>'
        f'<div class="latent-top">{picture}{logit_table(latent)}</div>'
        f'<div class="contexts">{contexts}</div></section>'
    )


def browser_html(run: EvaluatedRun, browser: LatentBrowser, histograms: dict[int, Image]) -> str:
    links = " ".join(f'<a href="#{esc(run.slug)}-latent-{lat.latent}">{lat.latent}</a>' for lat in browser.latents)
    body = "".join(latent_html(run, browser, lat, histograms.get(lat.latent)) for lat in browser.latents)
    return f"<h3>{esc(run.label)}</h3>{notes_html(browser.notes)}<p>latents: {links}</p>{body}"


def render(page: Page) -> str:
    def section(sid: str, title: str, content: str) -> str:
        return f'<section id="{sid}"><h2>{esc(title)}</h2>{notes_html(page.notes.get(sid, []))}{content}</section>'

    figures = lambda images: '<div class="figures">' + "".join(img(i) for i in images) + "</div>"  # noqa: E731
    sections = [
        ("runs", "Runs", runs_table(page)),
        ("training", "Training curves", figures([page.training] if page.training else [])),
        ("density", "Feature density", figures(page.densities)),
        ("frontier", "Sparsity–fidelity frontier", figures(page.frontiers)),
        ("metrics", "Eval metrics", metric_tables(page.runs)),
        (
            "latents",
            "Latent browser",
            '<p class="meta">Top-activating held-out contexts (a window around each peak; shading is the '
            "activation over the latent's max, grey tokens are positions the store keeps no row for), the "
            "distribution of its non-zero activations, and the output tokens its decoder direction promotes "
            "and suppresses through the unembedding.</p>"
            + "".join(browser_html(run, browser, hist) for run, browser, hist in page.browsers),
        ),
    ]
    nav = "<nav>" + "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in sections) + "</nav>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>saepipe report: {esc(', '.join(run.label for run in page.runs))}</title>"
        f"<style>{CSS}</style></head><body>"
        '<div id="check-banner" class="banner" hidden></div>'
        f'<h1>SAE report</h1><p class="meta">{len(page.runs)} run(s) · generated {esc(page.generated)}</p>'
        + nav
        + "".join(section(*s) for s in sections)
        + f"<script>{CHECK_SCRIPT}</script></body></html>\n"
    )
