"""tokens.html: the text with each token coloured by its top-1 expert, a layer selector, top-k on hover.

One self-contained file: inline CSS and JS, the routing embedded as JSON, nothing fetched. The token spans are
written into the HTML (html.escape'd), so the text reads even without JS; the script only recolours the spans
and sets their hover titles when another layer is chosen. Data: per layer, the experts (T·k, flat) and their
weights in thousandths (T·k, flat).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

NEWLINE_MARK = "↵"  # a newline token gets a visible mark before its line break, so it can be hovered


def expert_colours(num_experts: int) -> list[str]:
    """Distinct light colours (black text stays readable): hues spread by the golden angle, so neighbours differ."""
    return [f"hsl({(e * 137.508) % 360:.1f}, 75%, {78 if e % 2 == 0 else 68}%)" for e in range(num_experts)]


def _script_json(data: object) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' can close the element or start markup."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _piece(text: str) -> str:
    return html.escape(text.replace("\n", NEWLINE_MARK + "\n"))


def write_tokens_html(
    path: Path,
    pieces: list[str],
    layers: list[int],
    indices: dict[int, torch.Tensor],
    weights: dict[int, torch.Tensor],
    num_experts: int,
    title: str,
    note: str = "",
) -> None:
    """pieces: the text of each token, in order (their concatenation is the text); indices/weights: (T, k) per layer."""
    count = len(pieces)
    top_k = indices[layers[0]].shape[1]
    colours = expert_colours(num_experts)
    data = {
        "layers": layers,
        "k": top_k,
        "colours": colours,
        "experts": {str(layer): indices[layer][:count].reshape(-1).tolist() for layer in layers},
        "weights": {
            str(layer): (weights[layer][:count].double() * 1000).round().long().reshape(-1).tolist() for layer in layers
        },
    }
    first = indices[layers[0]][:count, 0].tolist()
    spans = "".join(
        f'<span class="t e{expert}" data-i="{i}">{_piece(piece)}</span>'
        for i, (piece, expert) in enumerate(zip(pieces, first, strict=True))
    )
    options = "".join(f'<option value="{layer}">MoE layer {layer}</option>' for layer in layers)
    css_experts = "".join(f".e{e}{{background:{c}}}" for e, c in enumerate(colours))
    page = TEMPLATE.format(
        title=html.escape(title),
        note=html.escape(note),
        options=options,
        spans=spans,
        css_experts=css_experts,
        data=_script_json(data),
    )
    Path(path).write_text(page, encoding="utf-8")


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #111; }}
header {{ position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc; }}
#legend span {{ display: inline-block; padding: 1px 6px; margin: 2px; border-radius: 3px; font-size: 90%; }}
#text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.7; margin-top: 1em; }}
.t {{ border-radius: 2px; box-shadow: inset -1px 0 #fff; }}
.t:hover {{ outline: 2px solid #000; }}
{css_experts}
</style>
</head>
<body>
<header>
<h1 style="font-size:1.2em;margin:0">{title}</h1>
<p style="margin:.3em 0">{note} Colour: top-1 expert. Hover a token for its top-k experts and weights.</p>
<label>Layer <select id="layer">{options}</select></label>
<div id="legend">top-1 share:</div>
</header>
<div id="text">{spans}</div>
<script type="application/json" id="routing-data">{data}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("routing-data").textContent);
const spans = document.querySelectorAll("#text .t");
const select = document.getElementById("layer");
function show(layer) {{
  const experts = data.experts[layer], weights = data.weights[layer], k = data.k;
  const top1 = new Array(data.colours.length).fill(0);
  spans.forEach((span, i) => {{
    const first = experts[i * k];
    top1[first] += 1;
    span.className = "t e" + first;
    span.dataset.expert = first;
    const parts = [];
    for (let j = 0; j < k; j++) {{
      parts.push("expert " + experts[i * k + j] + ": " + (weights[i * k + j] / 1000).toFixed(3));
    }}
    span.title = "layer " + layer + ", " + parts.join(", ");
  }});
  const legend = document.getElementById("legend");
  legend.replaceChildren("top-1 share: ", ...data.colours.map((colour, e) => {{
    const item = document.createElement("span");
    item.className = "e" + e;
    item.textContent = "expert " + e + " " + (100 * top1[e] / Math.max(spans.length, 1)).toFixed(1) + "%";
    return item;
  }}));
}}
select.addEventListener("change", () => show(select.value));
show(select.value);
</script>
</body>
</html>
"""
