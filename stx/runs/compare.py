"""``stx compare``: a table, a contact sheet and a style/content scatter plot of a sweep's (or an
experiment's) runs, best first: sorted by their objective (see :mod:`stx.runs.objectives`), with the
Pareto front of style distance against content distance marked. For a sweep they are logged to
the parent run, which is tagged with its best child (``stx.sweep.best_run``) or its Pareto set."""

from __future__ import annotations

import math
import re
import sys
import tempfile
import textwrap
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw, ImageFont

from stx.errors import StxError, first_line
from stx.runs import layout
from stx.runs.liveness import dead_reason
from stx.runs.schema import runs_dir
from stx.runs.store import existing_store, read_only_store

CELL = 256
LABEL_LINE = 14
STYLE, CONTENT = "eval/style_distance", "eval/content_distance"
SCORES = (layout.OBJECTIVE_METRIC, STYLE, "eval/structure", CONTENT, "eval/color_distance_style",
          "eval/color_distance_content")
"""The metrics the table shows (``eval/ssim_content``, logged too, is left out: ``eval/structure`` says at a
thumbnail's size what it says at full size, without counting the strokes a stylisation paints)."""


@dataclass
class Row:
    run: Run
    swept: dict[str, str]
    image: Image.Image | None
    on_front: bool = False


def find_runs(client: MlflowClient, target: str) -> tuple[list[Run], Run | None]:
    """The child runs of parent run ``target``, else the runs of experiment ``target`` (name or id)."""
    experiment = client.get_experiment_by_name(target)
    if experiment is None and target.isdigit():
        try:
            experiment = client.get_experiment(target)
        except MlflowException:
            experiment = None
    parent = layout.find_run(client, target) if experiment is None else None
    if parent is not None:
        runs = client.search_runs([parent.info.experiment_id], max_results=10000,
                                  filter_string=f"tags.{layout.TAG_PARENT} = '{parent.info.run_id}'")
    else:
        if experiment is None:
            raise StxError(f"{target!r} is neither a run id nor an experiment in {client.tracking_uri}; give a sweep's parent run id (printed when the sweep starts) or an experiment name such as 'stx'.")
        runs = [r for r in client.search_runs([experiment.experiment_id], max_results=10000) if layout.TAG_SWEEP not in r.data.tags]
    if not runs:
        raise StxError(f"no runs found for {target!r} in {client.tracking_uri}.")
    check_one_judge(runs, target)
    check_one_image_set(runs, target)
    return sorted(runs, key=lambda r: (int(r.data.tags.get(layout.TAG_JOB_NUM, 0)), r.info.start_time)), parent


def mixed(runs: list[Run], kind: Callable[[Run], str], separator: str) -> str:
    """``kind`` of each run counted, as ``"a (2 runs)<separator>b (1 run)"``, when the runs are of more than one
    kind; '' when they are all of one."""
    counts = Counter(kind(run) for run in runs)
    if len(counts) < 2:
        return ""
    return separator.join(f"{name} ({count} run{'s' if count > 1 else ''})" for name, count in sorted(counts.items()))


def check_one_judge(runs: list[Run], target: str) -> None:
    """Refuse to rank runs whose eval/ metrics come from different judges (tag ``stx.judge``):
    their distances are in different feature spaces and do not compare."""
    if found := mixed(runs, lambda run: run.data.tags.get(
            layout.TAG_JUDGE, "unrecorded (stx before the judge had its own config)"), ", "):
        raise StxError(
            f"the runs of {target!r} were judged by different networks: {found}; their eval/ metrics and objectives "
            f"do not compare. Compare a sweep (one judge), or run the jobs again with one judge.arch/judge.weights "
            f"in an experiment of their own (tracking.experiment=…)."
        )


def image_set(run: Run) -> str:
    """The content and style images a run was made from (its ``images.*`` params), as text."""
    params = run.data.params
    styles = [value for key, value in sorted(params.items()) if key.startswith("images.styles.")]
    return f"content {Path(params.get('images.content', '?')).name}, styles {', '.join(Path(s).name for s in styles)}" \
        + (f" (blend {params['images.style_weights']})" if params.get("images.style_weights", "None") != "None" else "")


def check_one_image_set(runs: list[Run], target: str) -> None:
    """Refuse to rank runs made from different content or style images: a distance to one photo and a
    distance to another do not compare."""
    if found := mixed(runs, image_set, "; "):
        raise StxError(
            f"the runs of {target!r} were made from different images: {found}; their eval/ metrics and objectives "
            f"measure distances to different pictures and do not compare. Compare a sweep's parent run id, or give "
            f"each image pair an experiment of its own (tracking.experiment=…)."
        )


def overrides(run: Run) -> dict[str, str]:
    """The run's command-line overrides as ``{key: value}``."""
    return layout.parse_overrides(run.data.tags.get(layout.TAG_OVERRIDES, ""))


def swept_values(runs: list[Run]) -> list[dict[str, str]]:
    """Per run, the overrides whose values differ between the runs (all of them for one run)."""
    per_run = [overrides(run) for run in runs]
    keys = sorted({key for o in per_run for key in o})
    varying = [k for k in keys if len({o.get(k) for o in per_run}) > 1] if len(runs) > 1 else keys
    return [{k: o.get(k, "-") for k in varying} for o in per_run]


def load_output(client: MlflowClient, run: Run, folder: Path) -> Image.Image | None:
    """The run's output image, or None when it has none or it cannot be read (a warning says why;
    its cell on the contact sheet says "no output image")."""
    names = {item.path for item in client.list_artifacts(run.info.run_id)}
    try:
        wanted = layout.output_names(run)
    except StxError as error:
        print(f"stx: warning: {error}", file=sys.stderr)
        return None
    for name in wanted:
        if name in names:
            path = client.download_artifacts(run.info.run_id, name, str(folder / run.info.run_id))
            try:  # a run's own output: Pillow's checks suffice (stx's input checks would load torch)
                with Image.open(path) as image:
                    return image.convert("RGB")
            except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on bad bytes
                print(f"stx: warning: run {run.info.run_id}'s output {name} cannot be read "
                      f"({first_line(exc)}); it is left out of the contact sheet.", file=sys.stderr)
                return None
    return None


def status(run: Run) -> str:
    """The run's MLflow status, or ``DEAD`` for a RUNNING run whose process is gone."""
    return "DEAD" if dead_reason(run) is not None else run.info.status


def loss_terms(run: Run) -> dict[str, float]:
    """Final total and weighted terms (per-layer values left out)."""
    terms = run.data.metrics.items()
    return {k: v for k, v in sorted(terms, key=lambda kv: (kv[0] != "total", kv[0])) if "/" not in k and k not in SCORES}


def pareto_front(runs: list[Run]) -> set[str]:
    """Ids of the runs that no other run beats on both style and content distance."""
    scored = [(r.info.run_id, r.data.metrics[STYLE], r.data.metrics[CONTENT]) for r in runs
              if STYLE in r.data.metrics and CONTENT in r.data.metrics]
    return {run_id for run_id, s, c in scored
            if not any(s2 <= s and c2 <= c and (s2, c2) != (s, c) for _, s2, c2 in scored)}


def best_first(rows: list[Row]) -> list[Row]:
    """Rows by objective (lowest first), then the front, then the rest in job order."""
    def key(row: Row) -> tuple:
        objective = row.run.data.metrics.get(layout.OBJECTIVE_METRIC, math.inf)
        return (objective if math.isfinite(objective) else math.inf, not row.on_front)
    return sorted(rows, key=key)


def load_plotting() -> None:
    """Load matplotlib (0.3 s) for :func:`scatter_plot`, drawing off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.offsetbox  # noqa: F401
    import matplotlib.pyplot  # noqa: F401


def scatter_plot(rows: list[Row], path: Path) -> Path | None:
    """Style distance against content distance, one thumbnail per run, the front joined; None
    when no run has both."""
    load_plotting()
    from matplotlib import pyplot
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    points = [(row, row.run.data.metrics[CONTENT], row.run.data.metrics[STYLE]) for row in rows
              if STYLE in row.run.data.metrics and CONTENT in row.run.data.metrics]
    if not points:
        return None
    figure, axes = pyplot.subplots(figsize=(8, 6), dpi=100)
    axes.scatter([x for _, x, _ in points], [y for _, _, y in points], s=8, color="gray")
    front = sorted((x, y) for row, x, y in points if row.on_front)
    axes.plot([x for x, _ in front], [y for _, y in front], color="tab:red", linewidth=1, label="Pareto front")
    for row, x, y in featured(points):
        if row.image is not None:
            thumbnail = row.image.copy()
            thumbnail.thumbnail((64, 64))
            axes.add_artist(AnnotationBbox(OffsetImage(thumbnail), (x, y), frameon=row.on_front, pad=0.1))
        label = swept_label(row) or row.run.info.run_id[:8]
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(0, -40), ha="center", fontsize=7)
    if len(points) > SCATTER_FEATURED:
        axes.set_title(f"{len(points)} runs: thumbnails for the Pareto front and the best by objective "
                       f"({SCATTER_FEATURED} at most); the contact sheet has every run", fontsize=8)
    axes.set_xlabel("content distance (eval/content_distance; 0 = the content's features)")
    axes.set_ylabel("style distance (eval/style_distance; 0 = the style's statistics)")
    axes.margins(0.15)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


SCATTER_FEATURED = 12
"""Most runs the scatter plot shows with a thumbnail and a label: more overlap until none can be read."""


def featured(points: list[tuple[Row, float, float]]) -> list[tuple[Row, float, float]]:
    """The points the scatter plot draws a thumbnail and a label for: all of a small sweep's; of a larger
    one the Pareto front's, then the best by objective, :data:`SCATTER_FEATURED` in all."""
    if len(points) <= SCATTER_FEATURED:
        return points
    by_objective = sorted(points, key=lambda p: (not p[0].on_front,
                                                 p[0].run.data.metrics.get(layout.OBJECTIVE_METRIC, math.inf)))
    return by_objective[:SCATTER_FEATURED]


def swept_label(row: Row) -> str:
    """The run's swept values as in its name: ``sw=1e3 lr=0.5``."""
    return " ".join(f"{name}={layout.short_value(str(value))}"
                    for name, value in zip(layout.short_keys(list(row.swept)), row.swept.values()))


def thumbnail(image: Image.Image, edge: int) -> Image.Image:
    """``image`` with its long edge ``edge`` px (pixels kept sharp when enlarged)."""
    scale = edge / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def contact_sheet(rows: list[Row]) -> Image.Image:
    """Outputs in a grid, each labelled with its swept values and final losses; a row is as tall
    as its tallest thumbnail (no gap above landscape images)."""
    font = ImageFont.load_default(size=12)
    labels = [[swept_label(row)] * bool(row.swept)
              + [f"{status(row.run).lower()} {row.run.info.run_id[:8]}" + (" front" if row.on_front else "")]
              + [f"{k.removeprefix('eval/')}={row.run.data.metrics[k]:.4g}" for k in SCORES[:3] if k in row.run.data.metrics]
              + [f"{k}={v:.4g}" for k, v in loss_terms(row.run).items() if k == "total"] for row in rows]
    label_height = LABEL_LINE * max(len(lines) for lines in labels) + 6
    thumbnails = [None if row.image is None else thumbnail(row.image, CELL - 8) for row in rows]
    image_height = max((t.height for t in thumbnails if t is not None), default=CELL // 2) + 8
    columns = math.ceil(math.sqrt(len(rows)))
    sheet = Image.new("RGB", (columns * CELL, math.ceil(len(rows) / columns) * (image_height + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (picture, lines) in enumerate(zip(thumbnails, labels)):
        x, y = (index % columns) * CELL, (index // columns) * (image_height + label_height)
        if picture is None:
            draw.rectangle((x + 4, y + 4, x + CELL - 4, y + image_height - 4), outline="gray")
            draw.text((x + 12, y + image_height // 2 - 6), "no output image", fill="gray", font=font)
        else:
            sheet.paste(picture, (x + (CELL - picture.width) // 2, y + image_height - 4 - picture.height))
        for number, line in enumerate(lines):
            draw.text((x + 4, y + image_height + 2 + number * LABEL_LINE), line[:40], fill="black", font=font)
    return sheet


SCORE_HEADERS = {layout.OBJECTIVE_METRIC: "objective", STYLE: "style_d", CONTENT: "content_d",
                 "eval/color_distance_style": "color_s", "eval/color_distance_content": "color_c",
                 "eval/structure": "struct"}
"""The table's short headers of :data:`SCORES` (its last line says what each stands for)."""


def table(rows: list[Row]) -> str:
    """A plain-text table, narrow enough for a terminal: run, status, Pareto front (``*``), swept
    values (short keys, as in run names), objective and quality metrics (short headers), final
    total loss; then a legend of the short names."""
    swept_keys = list(rows[0].swept)
    score_keys = [k for k in SCORES if any(k in row.run.data.metrics for row in rows)]
    term_keys = [k for k in ("total",) if any(k in row.run.data.metrics for row in rows)]
    short = dict(zip(swept_keys, layout.short_keys(swept_keys)))
    header = ["run", "status", "front", *short.values(), *(SCORE_HEADERS[k] for k in score_keys), *term_keys]
    body = [[row.run.info.run_id[:8], status(row.run), "*" if row.on_front else "-",
             *(layout.short_value(str(value)) for value in row.swept.values()),
             *(f"{row.run.data.metrics[k]:.4g}" if k in row.run.data.metrics else "-" for k in score_keys + term_keys)]
            for row in rows]
    widths = [max(len(str(cells[i])) for cells in [header, *body]) for i in range(len(header))]
    legend = [f"{name}: {key}" for key, name in short.items() if name != key]
    legend += [f"{SCORE_HEADERS[k]}: {k}" for k in score_keys if SCORE_HEADERS[k] != k]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]]
    notes = textwrap.wrap(f"({'; '.join(legend)}; lower is better but for struct)", 100) if legend else []
    return "\n".join([*lines, *notes])


def default_out_dir(uri: str, target: str) -> Path:
    """Where ``stx compare`` writes by default: ``compare/<target>`` beside the store it reads
    (the sqlite file's folder, or the folder holding a file store), and for a server (or any
    store without a local folder) in the runs folder."""
    store = urllib.parse.urlparse(uri)
    if store.scheme == "sqlite" and store.path not in ("", "/"):  # sqlite:///rel.db, sqlite:////abs.db
        base = Path(uri.removeprefix("sqlite:///").partition("?")[0]).resolve().parent
    elif store.scheme == "file" or (not store.scheme and Path(uri).is_dir()):
        base = Path(urllib.parse.unquote(store.path)).resolve().parent
    else:
        base = Path(runs_dir())
    return base / "compare" / (re.sub(r"[^\w.-]+", "_", target).strip(".") or "_")


def description(rows: list[Row], text: str) -> str:
    """A sweep parent's description (Markdown, on its page in MLflow's UI): its best run, the table and
    where the pictures are."""
    best = rows[0].run
    lines = [f"**Best run:** `{best.info.run_id}` ({swept_label(rows[0]) or 'the only setting'}), objective "
             f"{best.data.metrics.get(layout.OBJECTIVE_METRIC, math.nan):.4g}." if rows else "",
             "", "The best runs' pictures: *Images* (`best_runs`) on this page; every run's in the artifacts "
             "`compare/contact_sheet.png`, and `compare/scatter.png` (style against content distance).",
             "", "```", text, "```"]
    return "\n".join(lines)[:5000]


def compare(target: str, uri: str, out_dir: Path) -> tuple[Path, str]:
    """Write ``table.txt``, ``contact_sheet.png`` and ``scatter.png`` for ``target`` into
    ``out_dir``, best first; for a parent run, log them to it under ``compare/`` and tag it with
    the best child (``stx.sweep.best_run``, lowest ``objective``) or the Pareto set
    (``stx.sweep.pareto_runs``). Returns the sheet's path and the table."""
    client = existing_store(uri)
    runs, parent = find_runs(client, target)
    front = pareto_front(runs)
    with tempfile.TemporaryDirectory() as downloads:
        rows = [Row(run, swept, load_output(client, run, Path(downloads)), run.info.run_id in front)
                for run, swept in zip(runs, swept_values(runs))]
    rows = best_first(rows)
    text = table(rows)
    written = [out_dir / "table.txt", out_dir / "contact_sheet.png"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written[0].write_text(text + "\n")
        contact_sheet(rows).save(written[1])
        plot = scatter_plot(rows, out_dir / "scatter.png")
    except OSError as exc:
        raise StxError(f"stx compare cannot write its table and pictures into {out_dir} ({exc.strerror or exc}): "
                       f"give a folder you can write with --out <folder>.") from exc
    if parent is not None and read_only_store(uri):
        print(f"stx: the store {uri} is read-only: the comparison is not logged to sweep {parent.info.run_id}.",
              file=sys.stderr)
    elif parent is not None:
        for path in [*written, *([plot] if plot else [])]:
            client.log_artifact(parent.info.run_id, str(path), "compare")
        best = rows[0].run
        if layout.OBJECTIVE_METRIC in best.data.metrics:
            client.set_tag(parent.info.run_id, layout.TAG_BEST_RUN, best.info.run_id)
            # the best run's objective and quality metrics on the parent as best/…, so sweeps compare in the UI's
            # table, while the parent never ranks among its children by their objective
            now = int(time.time() * 1000)
            client.log_batch(parent.info.run_id, metrics=[
                Metric(f"{layout.BEST_PREFIX}{key}", value, now, 0) for key, value in best.data.metrics.items()
                if key == layout.OBJECTIVE_METRIC or key.startswith(layout.EVAL_PREFIX)])
        client.set_tag(parent.info.run_id, layout.TAG_DESCRIPTION, description(rows, text))
        client.log_image(parent.info.run_id, contact_sheet(rows[:SCATTER_FEATURED]), key="best_runs", step=0)
        if front:
            client.set_tag(parent.info.run_id, layout.TAG_PARETO_RUNS, ",".join(sorted(front)))
    return written[1], text
