"""Continual learning with impostors (issue 17; NNGK review section 4, Algorithm 1).

Runs the class-incremental protocol of fgjax/continual.py for every method of
config.continual.methods (softmax fine-tuning, loose impostors, loose + add/drop with
eq. 13), one subdirectory of --workdir per method, one JSON per finished task (a
killed run resumes at the first unfinished task), then writes <workdir>/summary.json,
<workdir>/table.md and the plot of the seen-class test accuracy after each task:

  python benchmarks/continual.py --config=configs/digits_continual.py \\
      --workdir=/work/runs/continual/digits --png=benchmarks/continual_digits.png

A variant (e.g. add only: --config.continual.num_drop=0
--config.continual.methods=add_drop --workdir=OTHER) joins the table and plot of a
finished workdir with --also=add_only=OTHER/add_drop.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/*_continual.py; override fields with --config.x.y=v.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where each method's tasks go.")
_PNG = flags.DEFINE_string("png", "", "The plot; empty: <workdir>/continual.png.")
_ALSO = flags.DEFINE_list(
    "also", [], "'label=dir' of task<e>.json rows of another finished run (e.g. a "
    "variant with other --config.continual fields) to add to the table and plot.")
flags.mark_flags_as_required(["config", "workdir"])


def markdown(rows: dict[str, list[dict]]) -> str:
  tasks = max(len(r) for r in rows.values())
  head = " | ".join(f"after task {e + 1}" for e in range(tasks))
  lines = [f"| method | {head} | forgetting | centers at the end "
           "| first task at the end |",
           "|---|" + "---|" * (tasks + 3)]
  for method, rs in rows.items():
    accs = " | ".join(f"{r['test_top1']:.3f}" for r in rs)
    last = rs[-1]
    forgot = "-" if last["forgetting"] is None else f"{last['forgetting']:.3f}"
    lines.append(f"| {method} | {accs} | {forgot} | "
                 f"{last['num_centers'] or '-'} | {last['test_top1_per_task'][0]:.3f} |")
  return "\n".join(lines)


def plot(rows: dict[str, list[dict]], png: str, title: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.2, 3.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for method, rs in rows.items():
    ax.plot([r["task"] + 1 for r in rs], [r["test_top1"] for r in rs], "o-",
            label=f"{method} (forgetting {rs[-1]['forgetting'] or 0:.2f})")
  ax.set_xticks(sorted({r["task"] + 1 for rs in rows.values() for r in rs}))
  ax.set_xlabel("tasks seen")
  ax.set_ylabel("test top-1 over the seen classes")
  ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=100)


def main(argv):
  del argv
  from fgjax import continual  # pylint: disable=g-import-not-at-top
  from fgjax import host_memory  # pylint: disable=g-import-not-at-top
  from fgjax import train  # pylint: disable=g-import-not-at-top
  from fgjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  host_memory.retain_freed_memory()
  config = _CONFIG.value
  if "continual" not in config:
    raise ValueError("the config has no `continual` section; use a "
                     "configs/*_continual.py file.")
  run = train.Run(config)
  rows = {m: continual.run_protocol(run, config, m, _WORKDIR.value)
          for m in config.continual.methods}
  for spec in _ALSO.value:
    label, _, folder = spec.partition("=")
    files = [f for f in os.listdir(folder) if f.startswith("task") and f.endswith(".json")]
    rows[label] = sorted((workdir_lib.read_json(os.path.join(folder, f)) for f in files),
                         key=lambda r: r["task"])
  text = markdown(rows)
  workdir_lib.write_json(os.path.join(_WORKDIR.value, "summary.json"),
                         {"config": config.to_dict(), "rows": rows})
  with open(os.path.join(_WORKDIR.value, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  png = _PNG.value or os.path.join(_WORKDIR.value, "continual.png")
  plot(rows, png, f"{config.data.source}, {config.continual.tasks} tasks "
       f"(class-incremental)")
  print(f"wrote {png}")


if __name__ == "__main__":
  app.run(main)
