"""Impostors at scale: step time and memory per device against M, full vs k-NN NCA.

  python benchmarks/impostor_scale.py --out=/work/runs/scale      # the whole grid
  python benchmarks/impostor_scale.py --out=... --groups=knn:fixed:128:4 --sizes=10000000

Every training step goes through fgjax's own update path (fgjax.update.make_update:
the impostor policy's `extend_batch`, the registered 'nca' term, the optax optimiser,
the state laid out by fgjax.train_state.Layout, impostor rows split over the devices)
with a synthetic network: a (512 -> d) linear embedding of synthetic 512-d features,
batch 256, 1,000 classes, synthetic impostors and (M, 64) neighbour lists computed
from the row indices (the step's cost does not depend on which rows they name;
refreshing the lists is a separate, amortised search, not timed here).

A group (kind full|knn, impostors fixed|loose, d, devices) runs in its own process
(XLA_FLAGS sets the host device count) and holds one state per M, timed round-robin
(rounds x steps each, median per M) so the M's compare within one run on this shared
machine. Memory per device is XLA's own accounting of the compiled step
(`memory_analysis`: arguments + outputs - aliased + temporaries, for one device's
program), next to the bytes of the state's shards on device 0 and the process's peak
RSS (all host devices live in one process here). Each group appends one JSON line to
<out>/results.jsonl as it finishes; finished groups are skipped on a rerun.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/work/runs/scale", "Directory of results.jsonl.")
_GROUPS = flags.DEFINE_list(
    "groups", [f"{kind}:{imps}:{d}:{n}" for kind in ("knn", "full")
               for imps in ("fixed", "loose") for d in (128, 512) for n in (1, 4)],
    "kind:impostors:d:devices groups.")
_SIZES = flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "Values of M.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Round-robin rounds over the sizes.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per size per round.")
_GROUP = flags.DEFINE_string("group", "", "Internal: run one group in this process.")
_REPORT = flags.DEFINE_list("report", [], "Only print the markdown table of these "
                            "results.jsonl files.")

BATCH, FEATURES, CLASSES, K = 256, 512, 1000, 64


def _build(kind: str, imps: str, d: int, m: int, mesh):
  """(update, state, batch) for one size."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from configs import common
  from fgjax import impostor_policies, objectives, optim, parallel
  from fgjax import train_state as ts
  from fgjax import update as update_lib
  from fgjax.impostors import ImpostorSet

  class LinearEmbedding(nn.Module):
    """The synthetic network: features -> embedding."""
    def setup(self):
      self.embed = nn.Dense(d, use_bias=False)

    def __call__(self, x, train=False):
      return self.head(x, train)

    def head(self, x, train=False):
      del train
      return {"embedding": self.embed(x)}

  class Network:
    module = LinearEmbedding()

  config = common.get_config()
  config.optim.weight_decay = 0.0
  policy = impostor_policies.make(
      {"knn": {"fixed": "knn", "loose": "knn_loose"}, "full": {"fixed": "fixed",
                                                                 "loose": "loose"}}[kind][imps],
      config)
  objective = objectives.build(("nca",), config.loss)
  layout = ts.Layout(mesh, m, policy.row_fields)

  # Impostors made where they live, elementwise from their indices: one device never
  # holds the whole matrix, and no random-bit buffers several times its size inflate
  # the process's peak memory (at M = 10M they took it to 23 GB). The values only
  # need to be spread out; the step's cost does not depend on them.
  def impostors():
    row = jnp.arange(layout.rows, dtype=jnp.uint32)
    golden = jnp.uint32(2654435761)   # Knuth's multiplicative hash
    centers = jnp.sin(row[:, None].astype(jnp.float32) * 0.7548777
                      + jnp.arange(d, dtype=jnp.float32)[None] * 0.5698403)
    labels = jnp.where(row < m, ((row * golden >> 7) % CLASSES).astype(jnp.int32),
                       -1)   # fgjax.impostors.ABSENT: the padding rows
    lists = ((row[:, None] * golden + jnp.arange(K, dtype=jnp.uint32) * 40503)
             % m).astype(jnp.int32)
    return centers, labels, lists
  split = parallel.row_sharding(mesh)
  centers, labels, lists = jax.jit(impostors, out_shardings=(split, split, split))()
  params = Network.module.init(jax.random.key(0), jnp.zeros((1, FEATURES)))["params"]
  imps = ImpostorSet(centers, labels)
  trainable = ts.trainable_tree({"net": params, "impostors": imps}, policy.trainable)
  tx = optim.make_optimizer(config, optim.trainable_labels(
      trainable, train_impostors=policy.trainable, frozen=frozenset()), 1000)
  # The optimiser state made under the layout too (Adam's moments of the centers).
  opt_state = jax.jit(tx.init, out_shardings=layout.shardings(
      ts.abstract(params=params, batch_stats={}, impostors=imps, loss_state={},
                  impostor_state={}, tx=tx, train_centers=policy.trainable)).opt_state)(
                      trainable)
  # The rest of the policy's state (knn_loose: lazy Adam's moments), zeros made split.
  _, shapes = policy.abstract(m, d)
  rest = {k: v for k, v in shapes.items() if k not in ("scale", "neighbors")}
  rest = jax.jit(lambda: {k: jnp.zeros((layout.rows, *v.shape[1:]), v.dtype)
                          for k, v in rest.items()},
                 out_shardings={k: split for k in rest})()
  state = layout.place(ts.TrainState(
      step=jnp.zeros((), jnp.int32), params={"net": params, "impostors": imps},
      batch_stats={}, opt_state=opt_state, loss_state={},
      impostor_state={"scale": jnp.ones(()), **rest,
                      **({"neighbors": lists} if kind == "knn" else {})},
      train_centers=policy.trainable))
  update = jax.jit(update_lib.make_update(
      Network, objective, tx, frozen=frozenset(), forward="heads", policy=policy,
      impostor_learning_rate=optim.impostor_learning_rate(config, 1000)),
                   donate_argnums=(0,),
                   out_shardings=(layout.shardings(state), parallel.replicated(mesh)))
  key = jax.random.key(1)
  batch = {"backbone": jax.random.normal(key, (BATCH, FEATURES), jnp.float32),
           "label": jax.random.randint(key, (BATCH,), 0, CLASSES, jnp.int32),
           "index": jax.random.randint(key, (BATCH,), 0, m, jnp.int32),
           "valid": jnp.ones((BATCH,), bool)}
  return update, state, jax.device_put(batch, parallel.batch_sharding(mesh))


def _memory(update, state, batch) -> dict:
  analysis = update.lower(state, batch).compile().memory_analysis()
  per_device = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {"compiled_per_device_bytes": int(per_device),
          "temp_bytes": int(analysis.temp_size_in_bytes)}


def _run_group(group: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from fgjax import parallel  # pylint: disable=g-import-not-at-top
  kind, imps, d, n = group.split(":")
  mesh = parallel.make_mesh(jax.devices()[:int(n)])
  sizes = [int(s) for s in _SIZES.value]
  built = {}
  for m in sizes:
    update, state, batch = _build(kind, imps, int(d), m, mesh)
    memory = _memory(update, state, batch)
    memory["state_bytes_device0"] = int(sum(
        s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
        if s.device == mesh.devices.flat[0]))
    for _ in range(2):   # compile + one warm step
      state, metrics = update(state, batch)
    jax.block_until_ready(metrics)
    built[m] = [update, state, batch, memory, []]
  for _ in range(_ROUNDS.value):
    for m in sizes:
      update, state, batch, _, times = built[m]
      for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = update(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
      built[m][1] = state
  return {"group": group, "kind": kind, "impostors": imps, "d": int(d), "devices": int(n),
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "sizes": {str(m): {"step_ms_median": 1e3 * statistics.median(built[m][4]),
                             "step_ms_min": 1e3 * min(built[m][4]), **built[m][3]}
                    for m in sizes}}


def report(paths) -> str:
  """Markdown: one row per group, step time per M, the largest M's ratio to the
  smallest, and the memory per device at the largest M."""
  rows = [json.loads(line) for path in paths for line in open(path)]
  sizes = sorted({int(m) for r in rows for m in r["sizes"]})
  head = " | ".join(f"M={m:,}" for m in sizes)
  out = [f"| step (kind, impostors, d, devices) | {head} | largest / smallest M | "
         "per device at the largest M: compiled step (state + temporaries) | "
         "process peak RSS |",
         "|---" * (len(sizes) + 4) + "|"]
  for r in rows:
    got = {int(m): v for m, v in r["sizes"].items()}
    cells = " | ".join(f"{got[m]['step_ms_median']:.1f} ms" if m in got else "-"
                       for m in sizes)
    low, high = got[min(got)], got[max(got)]
    ratio = high["step_ms_median"] / low["step_ms_median"] if len(got) > 1 else None
    out.append(
        f"| {r['kind']}, {r['impostors']}, {r['d']}, {r['devices']} | {cells} | "
        + (f"{ratio:.2f}x" if ratio else "-") + " | "
        f"{high['compiled_per_device_bytes'] / 2**20:,.0f} MiB "
        f"({high['state_bytes_device0'] / 2**20:,.0f} + "
        f"{high['temp_bytes'] / 2**20:,.0f}) | {r['peak_rss_bytes'] / 2**30:.1f} GiB |")
  return "\n".join(out)


def main(argv):
  del argv
  if _REPORT.value:
    print(report(_REPORT.value))
    return
  if _GROUP.value:
    print("RESULT " + json.dumps(_run_group(_GROUP.value)), flush=True)
    return
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "results.jsonl")
  done = set()
  if os.path.exists(path):
    with open(path) as f:
      done = {(r["group"], tuple(sorted(r["sizes"]))) for r in map(json.loads, f)}
  for group in _GROUPS.value:
    if (group, tuple(sorted(_SIZES.value))) in done:
      continue
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count="
               + group.split(":")[3])
    proc = subprocess.run(
        [sys.executable, __file__, f"--group={group}", f"--sizes={','.join(_SIZES.value)}",
         f"--rounds={_ROUNDS.value}", f"--steps={_STEPS.value}"],
        env=env, capture_output=True, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"{group}: failed\n{proc.stderr[-2000:]}", flush=True)
      continue
    row = json.loads(lines[0][len("RESULT "):])
    row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
