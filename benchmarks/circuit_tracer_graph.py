"""An attribution graph computed by circuit-tracer from a `saepipe export --format circuit-tracer` folder,
offline, and drawn as a PNG. Run it with the Python of an environment that has circuit-tracer (it pins
transformers<=4.57.3, which saepipe's own environment does not allow): `make circuit-tracer` builds one
in .venv-circuit-tracer and runs this file there. Standalone on purpose: it imports neither saepipe nor
anything circuit-tracer's environment lacks but matplotlib.

    python benchmarks/circuit_tracer_graph.py MODEL_DIR EXPORT_DIR OUT_DIR --prompt "..."

MODEL_DIR is a Hugging Face model folder (saepipe's cache holds the default model's, written by
transformers 5). Three things stop circuit-tracer 0.5.0 from running it offline as it is, each worked around
here and described in docs/circuit-tracer.md:
1. transformers 4.57 reads neither `rope_parameters` (it falls back to rope_theta 10,000 without a word)
   nor the tokenizer class `TokenizersBackend` that transformers 5 writes: a view of the folder with both
   rewritten is made beside OUT_DIR (the weights are symlinked, not copied);
2. TransformerLens 3.2 refuses a model name outside its list (SmolLM2 is not in it), a local folder
   included: local folders are let through;
3. its Llama conversion never sets `rotary_base` (10,000 again): it is copied from the config.
The replacement model's logits are then checked against the HF model's before anything is attributed.

Writes OUT_DIR/graph.png, OUT_DIR/graph.json (sizes, scores, the top logits, timings) and OUT_DIR/graph.pt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402 - after the offline switches


def transformers4_view(model_dir: Path, view: Path) -> Path:
    """A folder transformers 4.57 reads as transformers 5 meant: weights symlinked, config and tokenizer
    config rewritten (rope_theta at the top level; a fast tokenizer class it knows)."""
    view.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.name not in ("config.json", "tokenizer_config.json") and not (view / path.name).exists():
            (view / path.name).symlink_to(path.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        config["rope_theta"] = rope["rope_theta"]
        config.setdefault("rope_scaling", None)
    if config.get("model_type") == "gpt2":  # TransformerLens reads n_ctx, which transformers 5 no longer writes
        config.setdefault("n_ctx", config.get("n_positions"))
    (view / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = model_dir / "tokenizer_config.json"
    if tokenizer.exists():
        settings = json.loads(tokenizer.read_text())
        if settings.get("tokenizer_class") == "TokenizersBackend":
            settings["tokenizer_class"] = "PreTrainedTokenizerFast"
            settings.pop("backend", None)
        (view / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return view


def let_transformer_lens_load_folders() -> None:
    """TransformerLens accepts a local folder as a model name, with its config's rotary base."""
    import transformer_lens.loading_from_pretrained as loading
    from transformers import AutoConfig

    official, convert = loading.get_official_model_name, loading.convert_hf_model_config

    def official_name(name: str) -> str:
        return name if os.path.isdir(name) else official(name)

    def converted(name: str, **kwargs):
        cfg = convert(name, **kwargs)
        if os.path.isdir(name):
            rope = getattr(AutoConfig.from_pretrained(name), "rope_theta", None)
            if rope is not None:
                cfg["rotary_base"] = float(rope)
        return cfg

    loading.get_official_model_name, loading.convert_hf_model_config = official_name, converted


def draw(graph, pruned, path: Path, max_edges: int = 400) -> None:
    """The pruned graph: tokens along x, layers up y; features as dots (spread across their token's column),
    error nodes as squares, the `max_edges` strongest edges in blue (excitatory) and red (inhibitory),
    wider and darker by weight."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_features, n_pos = len(graph.selected_features), graph.n_pos
    n_layers, n_logits = graph.cfg.n_layers, len(graph.logit_targets)
    keep = pruned.node_mask
    places: dict[int, tuple[float, float, str]] = {}
    features = graph.active_features[graph.selected_features]
    cells: dict[tuple[int, int], list[int]] = {}
    for i in range(n_features):
        if keep[i]:
            layer, pos, _ = features[i].tolist()
            cells.setdefault((layer, pos), []).append(i)
    for (layer, pos), nodes in cells.items():  # a cell's features side by side in its token's column
        for j, node in enumerate(nodes):
            places[node] = (pos + 0.7 * ((j + 1) / (len(nodes) + 1) - 0.5), layer + 1, "feature")
    for i in range(n_layers * n_pos):
        if keep[n_features + i]:
            places[n_features + i] = (i % n_pos + 0.4, i // n_pos + 1, "error")
    tokens_start = n_features + n_layers * n_pos
    for pos in range(n_pos):
        places[tokens_start + pos] = (pos, 0, "token")
    for j in range(n_logits):
        places[tokens_start + n_pos + j] = (n_pos - 1 + 0.3 * (j - (n_logits - 1) / 2), n_layers + 1.5, "logit")

    fig = Figure(figsize=(max(7, 1.3 * n_pos + 2), 8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    edges = graph.adjacency_matrix * pruned.edge_mask
    target, source = torch.nonzero(edges, as_tuple=True)
    weights = edges[target, source]
    strongest = weights.abs().argsort(descending=True)[:max_edges]
    scale = float(weights.abs().max()) if len(weights) else 1.0
    for e in strongest.flip(0).tolist():  # the strongest drawn last, on top
        t, s, w = int(target[e]), int(source[e]), float(weights[e])
        if t in places and s in places:
            (x0, y0, _), (x1, y1, _) = places[s], places[t]
            strength = abs(w) / scale
            ax.plot([x0, x1], [y0, y1], color="C0" if w > 0 else "C3", alpha=0.15 + 0.6 * strength,
                    linewidth=0.3 + 2.5 * strength)  # fmt: skip
    style = {"feature": ("o", "C1", 26), "error": ("s", "0.6", 18), "token": ("D", "k", 30), "logit": ("^", "C2", 50)}
    for kind, (marker, color, size) in style.items():
        points = [(x, y) for x, y, k in places.values() if k == kind]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, marker=marker, color=color, s=size, zorder=3, label=kind)
    labels = graph.input_string_tokens if hasattr(graph, "input_string_tokens") else None
    ax.set_xticks(range(n_pos), labels or [str(t) for t in graph.input_tokens.tolist()], rotation=30, ha="right")
    ax.set_ylabel("layer (0: embeddings; top: logits)")
    top = ", ".join(repr(target.token_str) for target in graph.logit_targets[:3])
    ax.set_title(f"{graph.input_string!r}: pruned attribution graph, {max_edges} strongest edges; top logits {top}",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.2)
    fig.savefig(path, dpi=110, metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--backend", default="transformerlens", choices=("transformerlens", "nnsight"))
    parser.add_argument("--max-feature-nodes", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = transformers4_view(args.model_dir, args.out_dir / "model-transformers4")
    extra = {}
    if args.backend == "transformerlens":
        let_transformer_lens_load_folders()
        # its default context builds 8,192² masks per layer; learned positions allow no more than the model's
        config = json.loads((model_dir / "config.json").read_text())
        extra = {"n_ctx": min(512, config.get("n_positions") or config.get("max_position_embeddings") or 512)}
    model = ReplacementModel.from_pretrained(
        str(model_dir), str(args.export_dir.resolve()), backend=args.backend, device=torch.device("cpu"),
        dtype=torch.float32, **extra,
    )  # fmt: skip
    loaded = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        hf_logits = hf(ids).logits
        ours = model(ids) if args.backend == "transformerlens" else None
    logit_gap = None if ours is None else float((ours - hf_logits).abs().max())
    if logit_gap is not None and logit_gap > 1e-2:
        raise SystemExit(
            f"the replacement model's logits differ from the HF model's by {logit_gap:.3g}: not attributing"
        )

    graph = attribute(args.prompt, model, max_n_logits=5, desired_logit_prob=0.9, batch_size=64,
                      max_feature_nodes=args.max_feature_nodes)  # fmt: skip
    attributed = time.perf_counter()
    replacement, completeness = compute_graph_scores(graph)
    pruned = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    graph.to_pt(str(args.out_dir / "graph.pt"))
    graph.input_string_tokens = [repr(tokenizer.decode([t]))[1:-1] for t in graph.input_tokens.tolist()]
    draw(graph, pruned, args.out_dir / "graph.png")
    summary = {
        "prompt": args.prompt,
        "backend": args.backend,
        "transcoders": str(args.export_dir),
        "tokens": graph.n_pos,
        "active_features": len(graph.active_features),
        "selected_features": len(graph.selected_features),
        "kept_after_pruning": int(pruned.node_mask[: len(graph.selected_features)].sum()),
        "replacement_score": replacement,
        "completeness_score": completeness,
        "max_logit_gap_vs_hf": logit_gap,
        "top_logits": [target.token_str for target in graph.logit_targets],
        "load_s": loaded - started,
        "attribute_s": attributed - loaded,
    }
    (args.out_dir / "graph.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
