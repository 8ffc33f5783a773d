"""The demo's report: `report.json`, `report.md`, PNG plots and the printed table."""
from __future__ import annotations

import json
from pathlib import Path

from atlas_jax import fileio

SYSTEM_NOTES = {
    "closed_book": "reader alone, no retrieval",
    "frozen_retriever": "shipped retriever frozen (pre-trained + fine-tuned reader)",
    "no_pretraining": "reader + query tower fine-tuned on 64 questions only",
    "joint": "jointly pre-trained and fine-tuned; dense retrieval",
    "joint_hybrid": "same model; BM25 + dense, filters parsed from the question",
}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(report: dict) -> str:
    """Markdown table: one row per system, then the hot swap and the stage timings. With an
    answer selector, `EM best beam` is what the most likely beam alone would have scored."""
    systems = report["systems"]
    kinds = sorted({k for s in systems.values() for k in s["em_by_kind"]})
    best = any("em_best_beam" in s for s in systems.values())
    lines = ["| system | EM | " + ("EM best beam | " if best else "") + "F1 | R@1 | R@5 | R@20 | "
             + " | ".join(f"EM {k}" for k in kinds) + " |",
             "|" + " --- |" * (6 + best + len(kinds))]
    for name, s in systems.items():
        recall = s["recall_at_k"] or {}
        lines.append(f"| {name} | {_fmt(s['em'])} | "
                     + (f"{_fmt(s.get('em_best_beam'))} | " if best else "")
                     + f"{_fmt(s['f1'])} | "
                     + " | ".join(_fmt(recall.get(k)) for k in ("1", "5", "20")) + " | "
                     + " | ".join(_fmt(s["em_by_kind"].get(k)) for k in kinds) + " |")
    for name, baseline in report.get("baseline_retrievers", {}).items():
        recall = baseline["recall_at_k"]
        lines.append(f"| {name} as shipped (retrieval only) | - | " + ("- | " if best else "")
                     + "- | "
                     + " | ".join(_fmt(recall.get(k)) for k in ("1", "5", "20")) + " | "
                     + " | ".join("-" for _ in kinds) + " |")
    swap = report["hot_swap"]
    fresh_best = swap["refreshed"].get("em_best_beam")
    lines += ["", f"hot swap ({swap['system']}, `new` questions about "
              f"{swap['new_passages']} entries after the cutoff): stale index EM "
              f"{_fmt(swap['stale_em'])}, refreshed index EM {_fmt(swap['refreshed_em'])} "
              + ("" if fresh_best is None else f"(best beam {_fmt(fresh_best)}) ")
              + f"(R@5 {_fmt((swap['stale']['recall_at_k'] or {}).get('5'))} -> "
              f"{_fmt((swap['refreshed']['recall_at_k'] or {}).get('5'))})", "",
              "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    return "\n".join(lines)


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with fileio.atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def plot(out: Path, report: dict, metrics_paths: dict[str, Path],
         starts_from: dict[str, str | None] | None = None) -> list[Path]:
    """plots/loss_curves.png (loss per stage) and plots/recall_at_k.png (recall per system).

    `starts_from`: stage -> the stage whose parameters it starts from (`demo.STAGES`); a
    pre-training continuation is drawn after that stage's steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    stages = report["config"].get("stages", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in metrics_paths.items():
        rows = [r for r in _read_metrics(path) if "reader_loss" in r]
        if not rows:
            continue
        pretraining = name.startswith("pretrain")
        # A pre-training continuation is drawn after the steps of the stage it starts from.
        source = (starts_from or {}).get(name)
        offset = stages.get(source, {}).get("steps", 0) if pretraining and source else 0
        ax = axes[0] if pretraining else axes[1]
        ax.plot([offset + r["step"] for r in rows], [r["reader_loss"] for r in rows],
                label=name)
    task = stages.get("pretrain_joint", stages.get("pretrain_frozen", {})).get("task", "")
    kind = "salient spans" if "salient" in task else "span corruption"
    for ax, title in zip(axes, (f"pre-training ({kind})", "few-shot fine-tuning")):
        ax.set_title(f"reader loss: {title}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    written.append(_save(fig, folder / "loss_curves.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ks = ["1", "5", "20"]
    with_recall = {n: s["recall_at_k"] for n, s in report["systems"].items() if s["recall_at_k"]}
    with_recall.update({f"{n.split(':')[-1]} as shipped": b["recall_at_k"]
                        for n, b in report.get("baseline_retrievers", {}).items()})
    width = 0.8 / max(len(with_recall), 1)
    for i, (name, recall) in enumerate(with_recall.items()):
        ax.bar([j + i * width for j in range(len(ks))], [recall.get(k, 0) for k in ks], width,
               label=name)
    ax.set_xticks([j + width * (len(with_recall) - 1) / 2 for j in range(len(ks))])
    ax.set_xticklabels([f"recall@{k}" for k in ks])
    ax.set_ylim(0, 1.05)
    ax.set_title("gold ledger entry retrieved (test)")
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / "recall_at_k.png"))
    return written


def write(out: Path, report: dict, metrics_paths: dict[str, Path],
          starts_from: dict[str, str | None] | None = None) -> None:
    """report.json, plots, report.md (the table, the systems explained, the plots)."""
    plots = plot(out, report, metrics_paths, starts_from)
    fileio.atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=False))
    config = report["config"]
    lines = [
        "# atlas-jax ledger demo",
        "",
        f"Ledger {config['start']} .. {config['end']} (seed {config['seed']}), cutoff "
        f"{config['cutoff']}: {config['passages_before_cutoff']} entries indexed for training, "
        f"{config['passages_new']} arrive after it. {config['test_questions']} `test` "
        f"questions, {config['new_questions']} `new` questions. Fusion weight (dense, BM25 = 1) "
        f"chosen on dev: {config['dense_weight']} (dev recall@5 per weight: "
        f"{config['dense_weight_dev_recall_at_5']}).",
        "",
        table(report),
        "",
        "Systems:",
        "",
    ] + [f"- `{name}`: {note}" for name, note in SYSTEM_NOTES.items()] + [
        "",
    ] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    fileio.atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
