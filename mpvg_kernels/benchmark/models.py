"""Model-level benchmark: training and inference images/s of every PE mode, fused vs unfused, eager vs compiled.

One run measures, for each model and PE mode (``default``, ``lape``, ``pvg``, ``mpvg``):

- ``infer_b1``: inference at batch 1 (latency; reported as images/s = 1 / median seconds per call),
- ``infer_bN``: inference at a large batch (throughput),
- ``train``: one optimisation step (forward + backward + AdamW step) at the training batch,

under each implementation (``fused``: the configured fast backend, ``cpp`` on CPU when built, ``triton`` on CUDA,
with the inference PE cache; ``unfused``: backend ``torch`` and the PE cache switched off, the way the LaPE
reference code computes LN'(pos) at every forward) and each execution mode (``eager``, ``compile`` =
``torch.compile``).

All cases of one model are built first, warmed up, then timed in interleaved rounds by the harness
(:func:`.harness.time_interleaved`: case A, B, C, ..., A, B, C, ...), so machine noise lands on every case alike;
the reported figure is the median over the rounds. Results go to ``<out>/<name>.json``, ``.md`` and ``.png``.
``mpvg bench`` and ``benchmarks/bench_models.py`` run it; their flags are generated from :class:`BenchConfig`.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..dataclass_flags import option
from ..models import MODEL_CFGS, PE_MODES, create_model
from ..ops import backends
from . import harness

IMPLS = ("fused", "unfused")
EXECS = ("eager", "compile")
TASKS = ("infer_b1", "infer_bN", "train")
DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_lite_7_4_32")
SHORT_NAMES = {
    "deit_tiny_patch16_224": "DeiT-Ti",
    "deit_small_patch16_224": "DeiT-S",
    "deit_base_patch16_224": "DeiT-B",
    "vit_lite_7_4_32": "ViT-Lite-7/4",
    "vit_digits": "ViT-digits",
}
#: The model-level ratio targets: MPVG images/s over default-mode images/s (same model, implementation, execution).
#: They were set for, and are checked on, the CPU run only (:func:`applicable_targets`).
TARGETS = {"infer_b1": 0.98, "infer_bN": 0.98, "train": 0.97}


def applicable_targets(device: torch.device | str) -> dict[str, float]:
    """The ratio targets a run on ``device`` checks and reports: :data:`TARGETS` on CPU, none on any other device
    (no GPU target has been set; a CPU target printed next to GPU figures would be read as a GPU claim)."""
    return dict(TARGETS) if torch.device(device).type == "cpu" else {}
#: Config fields written under another key in the results' "config": the PE-mode fields were called modes and
#: compile_modes when the committed results were written (and the flags keep those names).
RESULT_KEYS = {"pes": "modes", "compile_pes": "compile_modes"}


def parse_batch_item(text: str) -> tuple[str, tuple[int, int]]:
    """``MODEL=INFER,TRAIN`` (the value of ``--batch``) -> ``(model, (infer, train))``."""
    import argparse

    try:
        model, sizes = text.split("=", 1)
        bi, bt = (int(s) for s in sizes.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch expects MODEL=INFER,TRAIN (e.g. vit_lite_7_4_32=64,32), got {text!r}"
        ) from None
    return model.strip(), (bi, bt)


@dataclass
class BenchConfig:
    """What one benchmark run measures and where it writes. Every field is a flag of ``mpvg bench`` (its metadata
    is the flag's help), generated the way ``mpvg train``'s flags are generated from ``TrainConfig``."""

    models: list[str] = option(list(DEFAULT_MODELS), "comma-separated model names", sep=",", metavar="NAME,...")
    #: PE modes (``pe`` of create_model); the flag stays --modes, and the records keep the key "mode"
    pes: list[str] = option(
        list(PE_MODES), "comma-separated PE modes", sep=",", flags=("--modes", "--pes"), choices=PE_MODES,
        metavar="PE,...",
    )
    impls: list[str] = option(list(IMPLS), "implementations", sep=",", choices=IMPLS, metavar="IMPL,...")
    execs: list[str] = option(list(EXECS), "execution modes", sep=",", choices=EXECS, metavar="EXEC,...")
    tasks: list[str] = option(list(TASKS), "tasks", sep=",", choices=TASKS, metavar="TASK,...")
    batch_infer: int = option(16, "large inference batch (infer_bN) of the models without a --batch entry")
    batch_train: int = option(8, "training batch of the models without a --batch entry")
    #: per-model overrides of (batch_infer, batch_train), e.g. {"vit_lite_7_4_32": (64, 32)}
    batch_overrides: dict[str, tuple[int, int]] = option(
        {"deit_tiny_patch16_224": (8, 4), "deit_small_patch16_224": (4, 2), "vit_lite_7_4_32": (32, 16)},
        "per-model batch sizes, e.g. vit_lite_7_4_32=64,32, added to the built-in ones (repeatable)",
        flags=("--batch",), item=parse_batch_item, metavar="MODEL=INFER,TRAIN",
        default_help="deit_tiny_patch16_224=8,4 deit_small_patch16_224=4,2 vit_lite_7_4_32=32,16",
    )
    warmup: int = option(2, "warm-up calls per case, the first compiles")
    rounds: int = option(12, "interleaved timing rounds")
    #: calls per timed sample: at least ``iters``, more for fast cases so that one sample lasts ``min_sample_s``
    iters: int = option(1, "minimum calls per timed sample")
    min_sample_s: float = option(0.25, "fast cases repeat calls until one sample lasts this long (seconds)")
    max_inner: int = option(50, "maximum calls per timed sample")
    threads: int = option(1, "torch CPU threads")
    pool: str = option("avg", "pooling of every model whose registry entry does not fix one (--model-arg pool=... "
                       "wins)", choices=("avg", "cls"))
    seed: int = option(0, "seed of the weights and the input images")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (auto = cuda when available, else cpu)")
    out_dir: str = option("benchmarks/results", "where to write NAME.json/.md/.png")
    name: str = option("", "file name stem", default_help="models_<device>, e.g. models_cpu; models_smoke with --smoke")
    progress: bool = option(True, "progress bar on stderr")
    model_kwargs: dict[str, Any] = option({}, "create_model keywords for every model", flags=("--model-arg",))
    #: compiled cases are costly on CPU (tens of seconds of compilation each): they run only for these models,
    #: modes, implementations and tasks (empty list: all of the run's)
    compile_models: list[str] = option(
        ["vit_lite_7_4_32"], "models with compiled cases ('' = all)", sep=",", metavar="NAME,..."
    )
    compile_pes: list[str] = option(
        ["default", "mpvg"], "PE modes with compiled cases ('' = all)", sep=",", flags=("--compile-modes",),
        choices=PE_MODES, metavar="PE,...",
    )
    compile_impls: list[str] = option(
        [], "implementations with compiled cases ('' = all)", sep=",", choices=IMPLS, metavar="IMPL,...",
        default_help="all",
    )
    compile_tasks: list[str] = option(
        ["infer_bN", "train"], "tasks with compiled cases ('' = all)", sep=",", choices=TASKS, metavar="TASK,..."
    )

    def wants(self, model: str, pe: str, impl: str, ex: str, task: str) -> bool:
        """Whether the case is part of the run (every eager case; compiled ones per the compile_* filters)."""
        if ex != "compile":
            return True
        return all(
            not allowed or value in allowed
            for value, allowed in (
                (model, self.compile_models),
                (pe, self.compile_pes),
                (impl, self.compile_impls),
                (task, self.compile_tasks),
            )
        )

    def batches(self, model: str) -> tuple[int, int]:
        """(inference batch, training batch) for one model."""
        return tuple(self.batch_overrides.get(model, (self.batch_infer, self.batch_train)))  # type: ignore[return-value]

    def record(self) -> dict[str, Any]:
        """The config as written in the results (see :data:`RESULT_KEYS`)."""
        return {RESULT_KEYS.get(k, k): v for k, v in asdict(self).items()}


@dataclass
class Case:
    """One timed configuration: a model, PE mode, implementation, execution mode and task."""

    model: str
    pe: str
    impl: str
    exec: str
    task: str
    batch: int
    run: Callable[[], None] = field(repr=False, default=lambda: None)
    #: the tensors ``run`` feeds the model (the run's device; dropped with ``run`` after timing)
    inputs: tuple[torch.Tensor, ...] = field(repr=False, default=())
    timing: harness.Timing | None = None
    error: str = ""

    @property
    def label(self) -> str:
        return f"{self.pe}/{self.impl}/{self.exec}/{self.task}"


def resolve(cfg: BenchConfig) -> tuple[BenchConfig, torch.device]:
    """The device of the run (a :class:`UserError` when it is CUDA and there is none) and the config with its
    file name stem filled in (``models_<device>`` unless set)."""
    from ..device import resolve_device

    device = resolve_device(cfg.device)
    return replace(cfg, name=cfg.name or f"models_{device.type}"), device


# ----------------------------------------------------------------------------------------------- cases


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a model takes (its ``default_cfg["input_size"]``)."""
    c, h, w = model.default_cfg["input_size"]  # type: ignore[index]
    return int(c), int(h), int(w)


@contextlib.contextmanager
def pe_cache_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` without its inference PE cache (LN'(pos) recomputed at every forward, as in the LaPE code)."""
    if not hasattr(model, "pe_cache_enabled"):
        raise RuntimeError(f"{type(model).__name__} has no pe_cache_enabled switch")
    old = model.pe_cache_enabled
    model.pe_cache_enabled = False
    try:
        yield
    finally:
        model.pe_cache_enabled = old


def _impl_context(impl: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    if impl == "fused":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(backends.use_backend("torch"))
    stack.enter_context(pe_cache_disabled(model))
    return stack


def _pair_order(pe: str) -> int:
    """Round order of the PE modes: default and mpvg (the pair the targets compare) back to back."""
    return ("default", "mpvg", "pvg", "lape").index(pe) if pe in PE_MODES else len(PE_MODES)


def make_cases(name: str, cfg: BenchConfig, device: torch.device | str = "cpu") -> list[Case]:
    """Build every case of one model on ``device``.

    Per PE mode there is one inference model (eval mode; shared by the implementations, execution modes and batch
    sizes: the implementation is a context entered at each call) and one training model with its AdamW optimizer
    (shared the same way; its weights drift, which does not change the cost); each is freshly initialised from
    ``cfg.seed`` with ``create_model(name, pe=..., pool=cfg.pool, **cfg.model_kwargs)`` (``pool`` only where the
    registry leaves it open). Compiled cases wrap the
    shared module in their own ``torch.compile`` object (static shapes), so each compiles once for its batch size.
    """
    device = torch.device(device)
    b_inf, b_train = cfg.batches(name)
    gen = torch.Generator().manual_seed(cfg.seed)
    fixed = "pool" in MODEL_CFGS[name]["model"]  # a family built around its pooling (distilled, seq) keeps it
    kwargs = {**({} if fixed else {"pool": cfg.pool}), **cfg.model_kwargs}
    infer_models: dict[str, torch.nn.Module] = {}
    train_models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for pe in cfg.pes:
        if any(t != "train" for t in cfg.tasks):
            torch.manual_seed(cfg.seed)
            infer_models[pe] = create_model(name, pe=pe, **kwargs).to(device).eval()
        if "train" in cfg.tasks:
            torch.manual_seed(cfg.seed)
            m = create_model(name, pe=pe, **kwargs).to(device).train()
            train_models[pe] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05))
    ref = next(iter(infer_models.values())) if infer_models else next(iter(train_models.values()))[0]
    c, h, w = input_shape(ref)
    inputs = {  # the same images for every PE mode, made on the CPU generator, resident on the device
        "infer_b1": torch.randn(1, c, h, w, generator=gen).to(device),
        "infer_bN": torch.randn(b_inf, c, h, w, generator=gen).to(device),
        "train": torch.randn(b_train, c, h, w, generator=gen).to(device),
    }
    labels = torch.randint(0, int(ref.num_classes), (b_train,), generator=gen).to(device)
    cases: list[Case] = []
    # PE mode innermost: the modes of one (impl, exec, task) run back to back in every round (paired ratios)
    for impl in cfg.impls:
        for ex in cfg.execs:
            for task in cfg.tasks:
                for pe in sorted(cfg.pes, key=_pair_order):
                    if not cfg.wants(name, pe, impl, ex, task):
                        continue
                    x = inputs[task]
                    case = Case(name, pe, impl, ex, task, x.shape[0])
                    model = train_models[pe][0] if task == "train" else infer_models[pe]
                    fn: Callable[[torch.Tensor], torch.Tensor] = model
                    if ex == "compile":
                        fn = torch.compile(model, dynamic=False)
                    if task == "train":
                        case.run = _train_step(model, fn, x, labels, impl, train_models[pe][1])
                        case.inputs = (x, labels)
                    else:
                        case.run = _infer_step(model, fn, x, impl)
                        case.inputs = (x,)
                    cases.append(case)
    return cases


def _infer_step(model: torch.nn.Module, fn: Callable, x: torch.Tensor, impl: str) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), _impl_context(impl, model):
            fn(x)

    return run


def _train_step(
    model: torch.nn.Module, fn: Callable, x: torch.Tensor, y: torch.Tensor, impl: str, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    def run() -> None:
        with _impl_context(impl, model):
            loss = torch.nn.functional.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def run_model(name: str, cfg: BenchConfig, bar: Any = None, device: torch.device | str = "cpu") -> list[Case]:
    """Build every case of one model, then warm up (compiling where asked) and time them with the harness.

    Each case's calls per sample are calibrated on its own last warm-up call (at least ``iters``, at most
    ``max_inner``, enough to last ``min_sample_s``); a collection runs before every round, never inside one; a case
    that fails is recorded with its error and left out of the timing.
    """
    cases = make_cases(name, cfg, device)
    short = SHORT_NAMES.get(name, name)

    def progress(label: str, calls: int) -> None:
        if bar is not None:
            if label:
                bar.set_postfix_str(f"{short} {label}")
            if calls:
                bar.update(calls)

    errors: dict[str, str] = {}
    timings = harness.time_interleaved(
        {case.label: case.run for case in cases},
        device,
        rounds=cfg.rounds,
        warmup=cfg.warmup,
        min_sample_s=cfg.min_sample_s,
        min_inner=cfg.iters,
        max_inner=cfg.max_inner,
        inner="each",
        collect_each_round=True,
        errors=errors,
        progress=progress,
    )
    for case in cases:
        case.timing = timings.get(case.label)
        case.error = errors.get(case.label, "")
        case.run = lambda: None  # drop the model references
        case.inputs = ()
    if bar is not None and errors:
        bar.update(len(errors) * cfg.rounds)
    return cases


# ----------------------------------------------------------------------------------------------- results


def summarise(cases: list[Case]) -> list[dict[str, Any]]:
    """One record per case: median seconds per call and images/s.

    The PE mode is recorded under the key ``mode``, as in the results committed before it was renamed ``pe``.
    """
    out = []
    for c in cases:
        t = c.timing or harness.Timing.of([])
        out.append(
            {
                "model": c.model,
                "mode": c.pe,
                "impl": c.impl,
                "exec": c.exec,
                "task": c.task,
                "batch": c.batch,
                "median_s": t.median_s,
                "images_per_s": c.batch / t.median_s if t.samples else float("nan"),
                "min_s": t.min_s,
                "p25_s": t.p25_s,
                "p75_s": t.p75_s,
                "n": t.samples,
                "calls_per_sample": t.inner,
                "times_s": [round(v, 6) for v in t.all_s],
                "first_call_s": t.first_call_s if c.timing else 0.0,
                "error": c.error,
            }
        )
    return out


def _paired_ratio(base_times: list[float], times: list[float]) -> float:
    """Median over rounds of (base seconds / seconds) within the same round: drift between rounds cancels."""
    n = min(len(base_times), len(times))
    if n == 0:
        return float("nan")
    return statistics.median(base_times[r] / times[r] for r in range(n))


def ratios(
    records: list[dict[str, Any]], base: str = "default", targets: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """images/s of every mode over the ``base`` mode's, for the same model, implementation, execution and task.

    ``ratio_vs_default``: ratio of the medians (the figure the targets are checked on); ``paired_ratio``: median of
    the per-round ratios (the modes of one implementation, execution and task run back to back in each round);
    ``best_ratio``: ratio of the fastest calls (noise from other jobs only ever adds time). ``targets``: per task,
    the MPVG rows' target (:data:`TARGETS` when None; ``{}``: no targets, ``target`` and ``met`` are None).
    """
    targets = TARGETS if targets is None else targets
    idx = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in records}
    out = []
    for r in records:
        if r["mode"] == base:
            continue
        b = idx.get((r["model"], base, r["impl"], r["exec"], r["task"]))
        if b is None:
            continue
        ratio = r["images_per_s"] / b["images_per_s"]
        paired = _paired_ratio(b.get("times_s", []), r.get("times_s", []))
        best = b["min_s"] / r["min_s"] if r["n"] and b["n"] else float("nan")
        target = targets.get(r["task"]) if r["mode"] == "mpvg" else None
        out.append(
            {
                "model": r["model"],
                "mode": r["mode"],
                "impl": r["impl"],
                "exec": r["exec"],
                "task": r["task"],
                "ratio_vs_default": ratio,
                "paired_ratio": paired,
                "best_ratio": best,
                "target": target,
                "met": None if target is None or ratio != ratio else bool(ratio >= target),
            }
        )
    return out


def speedups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fused over unfused images/s, for the same model, mode, execution and task."""
    idx = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in records}
    out = []
    for r in records:
        if r["impl"] != "fused":
            continue
        u = idx.get((r["model"], r["mode"], "unfused", r["exec"], r["task"]))
        if u is not None:
            out.append(
                {
                    "model": r["model"],
                    "mode": r["mode"],
                    "exec": r["exec"],
                    "task": r["task"],
                    "fused_over_unfused": r["images_per_s"] / u["images_per_s"],
                }
            )
    return out


def _fmt_load(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _fmt(v: float) -> str:
    if v != v:
        return "—"
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def to_markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables: images/s, MPVG/PE-mode ratios vs default, fused/unfused speed-ups."""
    env, cfg, recs = result["environment"], result["config"], result["records"]
    lines = [
        f"# Model benchmark ({result['config']['name']})",
        "",
        f"- device: {env['device']} ({env['cpu']}, {env['logical_cpus']} logical CPUs"
        + (f"; {env['gpu']}" if env.get("gpu") else "")
        + f"), {env['threads']} thread(s); torch {env['torch']}, python {env['python']}, "
        f"mpvg-kernels {env['mpvg_kernels']} ({env['git_commit']})",
        f"- fused backend: `{env['fused_backend']}` (C++ loaded: {env['cpp_backend_loaded']}); "
        f"unfused: backend `torch`, PE cache off",
        f"- malloc: {env['malloc']['how']}; date {env['date_utc']}; run took {result.get('wall_s', 0) / 60:.1f} min; "
        f"1-min load average {_fmt_load(result.get('loadavg_1m_start'))} at start, "
        f"{_fmt_load(env.get('loadavg_1m_end'))} at end "
        "(other jobs share these cores: ratios from one interleaved run only)",
        f"- command: `{env['command']}`",
        f"- medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up call(s); one sample per case "
        f"and round = the mean of enough calls (at least {cfg['iters']}) to last {cfg.get('min_sample_s', 0)} s; "
        "images/s = batch / median seconds per call; train = forward + backward + AdamW step",
        "",
    ]
    tasks = [t for t in TASKS if any(r["task"] == t for r in recs)]
    morder = list(dict.fromkeys(r["model"] for r in recs))
    task_cols = [(t, t) for t in tasks]

    def order(row: tuple[str, ...]) -> tuple[int, ...]:
        return (morder.index(row[0]), *_row_order(row)[1:])

    lines += _target_table(result, tasks, morder)
    lines += ["## Images/s", ""]
    by_key = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in recs}
    rows = sorted({(r["model"], r["mode"], r["impl"], r["exec"]) for r in recs}, key=order)
    for model in dict.fromkeys(r[0] for r in rows):
        b_inf = next((r["batch"] for r in recs if r["model"] == model and r["task"] == "infer_bN"), None)
        b_tr = next((r["batch"] for r in recs if r["model"] == model and r["task"] == "train"), None)
        lines += [f"### {SHORT_NAMES.get(model, model)} (`{model}`; infer_bN B={b_inf}, train B={b_tr})", ""]
        cells = []
        for row in rows:
            if row[0] != model:
                continue
            cell = {"mode": row[1], "impl": row[2], "exec": row[3]}
            for t in tasks:
                r = by_key.get((*row, t))
                cell[t] = "error" if r and r["error"] else _fmt(r["images_per_s"]) if r else ""
            cells.append(cell)
        cols = [("mode", "mode"), ("impl", "impl"), ("exec", "exec"), *task_cols]
        lines += [harness.markdown_table(cells, cols, right=tasks), ""]
    rat = result["ratios"]
    if rat:
        lines += ["## Ratio to `default` mode (images/s; same model, impl, exec, task)", ""]
        targets = result_targets(result)
        if targets:
            lines += [
                "Targets for `mpvg` with `fused` (CPU): "
                + ", ".join(f"{t} >= {targets[t]:.0%}" for t in TASKS if t in targets)
                + ".",
                "",
            ]
        else:
            lines += [f"No targets apply to a {env['device']} run (the targets are the CPU run's).", ""]
        rk = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in rat}
        cells = []
        for row in sorted({(r["model"], r["mode"], r["impl"], r["exec"]) for r in rat}, key=order):
            cell = {"model": SHORT_NAMES.get(row[0], row[0]), "mode": row[1], "impl": row[2], "exec": row[3]}
            for t in tasks:
                r = rk.get((*row, t))
                if r is None or r["ratio_vs_default"] != r["ratio_vs_default"]:
                    cell[t] = "—"
                    continue
                mark = ""
                if r["met"] is not None and row[2] == "fused":
                    mark = " ✓" if r["met"] else " ✗"
                cell[t] = f"{r['ratio_vs_default']:.3f}{mark}"
            cells.append(cell)
        cols = [("model", "model"), ("mode", "mode"), ("impl", "impl"), ("exec", "exec"), *task_cols]
        lines += [harness.markdown_table(cells, cols, right=tasks), ""]
    sp = result["speedups"]
    if sp:
        lines += ["## Fused over unfused (images/s ratio)", ""]
        sk = {(r["model"], r["mode"], r["exec"], r["task"]): r for r in sp}
        cells = []
        for row in sorted({(r["model"], r["mode"], "", r["exec"]) for r in sp}, key=order):
            cell = {"model": SHORT_NAMES.get(row[0], row[0]), "mode": row[1], "exec": row[3]}
            for t in tasks:
                r = sk.get((row[0], row[1], row[3], t))
                cell[t] = f"{r['fused_over_unfused']:.3f}" if r else "—"
            cells.append(cell)
        cols = [("model", "model"), ("mode", "mode"), ("exec", "exec"), *task_cols]
        lines += [harness.markdown_table(cells, cols, right=tasks), ""]
    errs = [r for r in recs if r["error"]]
    if errs:
        lines += ["## Errors", ""]
        lines += [f"- {r['model']} {r['mode']} {r['impl']} {r['exec']} {r['task']}: `{r['error']}`" for r in errs]
        lines.append("")
    first = [r for r in recs if r["exec"] == "compile" and not r["error"]]
    if first:
        tot = sum(r["first_call_s"] for r in first)
        lines += [f"Compilation (first calls of compiled cases): {tot:.0f} s in all.", ""]
    return "\n".join(lines)


def result_targets(result: dict[str, Any]) -> dict[str, float]:
    """The targets a result was checked against (results written before they were recorded: the CPU rule)."""
    if "targets" in result:
        return dict(result["targets"])
    return applicable_targets(result["environment"].get("device", "cpu"))


def _target_table(result: dict[str, Any], tasks: list[str], morder: list[str]) -> list[str]:
    """The headline claim in one table: fused MPVG images/s over fused default (GAP) images/s, per model/exec/task
    (only for a run that has targets: the CPU run)."""
    rat = [r for r in result["ratios"] if r["mode"] == "mpvg" and r["impl"] == "fused" and r.get("target")]
    if not rat:
        return []
    lines = [
        "## MPVG vs default (both GAP, fused, same run)",
        "",
        "Targets (CPU): "
        + ", ".join(f"{t} >= {v:.2f}" for t, v in result_targets(result).items())
        + ". `medians`: ratio of the median images/s (the checked figure); "
        "`paired`: median of the per-round ratios (the modes run back to back in each round); `best`: ratio of "
        "the fastest calls.",
        "",
    ]
    cells = []
    for r in sorted(rat, key=lambda r: (morder.index(r["model"]), EXECS.index(r["exec"]), TASKS.index(r["task"]))):
        cells.append(
            {
                "model": SHORT_NAMES.get(r["model"], r["model"]),
                "exec": r["exec"],
                "task": r["task"],
                "medians": f"{r['ratio_vs_default']:.3f}",
                "paired": f"{r.get('paired_ratio', float('nan')):.3f}",
                "best": f"{r.get('best_ratio', float('nan')):.3f}",
                "target": f"{r['target']:.2f}",
                "met": "—" if r["met"] is None else ("yes" if r["met"] else "**no**"),
            }
        )
    cols = [(k, k) for k in ("model", "exec", "task", "medians", "paired", "best", "target", "met")]
    return [*lines, harness.markdown_table(cells, cols, right=("medians", "paired", "best", "target")), ""]


def _row_order(row: tuple[str, ...]) -> tuple[int, ...]:
    def pos(seq: tuple[str, ...], v: str) -> int:
        return seq.index(v) if v in seq else len(seq)

    return (0, pos(PE_MODES, row[1]), pos(IMPLS, row[2]), pos(EXECS, row[3]))


def _ratio_range(values: list[float], usual: tuple[float, float] = (0.8, 1.1)) -> tuple[float, float]:
    """The y range of a ratio panel: ``usual``, widened (with a 5% margin) to include every value."""
    lo, hi = min([usual[0], *values]), max([usual[1], *values])
    pad = 0.05 * (hi - lo) if (lo, hi) != usual else 0.0
    return lo - pad if lo < usual[0] else lo, hi + pad if hi > usual[1] else hi


def plot(result: dict[str, Any], path: Path) -> None:
    """PNG chart: per model and task, images/s of each mode relative to ``default`` mode (same impl and exec), one
    bar group per implementation/execution; the dashed line is the MPVG target (CPU runs only). The y axis spans
    0.80-1.10, widened to include every bar and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["records"] if not r["error"]]
    models = list(dict.fromkeys(r["model"] for r in recs))
    tasks = [t for t in TASKS if any(r["task"] == t for r in recs)]
    if not models or not tasks:
        return
    targets = result_targets(result)
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.2 * len(tasks), 3.0 * len(models)), squeeze=False)
    modes = [m for m in PE_MODES if any(r["mode"] == m for r in recs)]
    colors = {"default": "#7f7f7f", "lape": "#1f77b4", "pvg": "#ff7f0e", "mpvg": "#2ca02c"}
    width = 0.8 / max(len(modes), 1)
    idx = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in recs}
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            groups = [
                (im, e)
                for im in IMPLS
                for e in EXECS
                if (model, "default", im, e, task) in idx
                and any((model, m, im, e, task) in idx for m in modes if m != "default")
            ]
            shown = [targets[task]] if task in targets else []
            for k, mode in enumerate(modes):
                vals = []
                for g in groups:
                    r, b = idx.get((model, mode, g[0], g[1], task)), idx[(model, "default", g[0], g[1], task)]
                    vals.append(r["images_per_s"] / b["images_per_s"] if r else float("nan"))
                xs = [g + (k - (len(modes) - 1) / 2) * width for g in range(len(groups))]
                ax.bar(xs, vals, width, label=mode, color=colors.get(mode))
                shown += [v for v in vals if math.isfinite(v)]
            if task in targets:
                ax.axhline(targets[task], color="black", linewidth=0.8, linestyle="--")
            ax.set_ylim(*_ratio_range(shown))
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{g[0]}\n{g[1]}" for g in groups], fontsize=8)
            batch = next((r["batch"] for r in recs if r["model"] == model and r["task"] == task), "?")
            base = [f"{idx[(model, 'default', g[0], g[1], task)]['images_per_s']:.3g}" for g in groups]
            ax.set_title(
                f"{SHORT_NAMES.get(model, model)} {task} (B={batch}); default img/s: {', '.join(base)}", fontsize=8
            )
            ax.set_ylabel("images/s / default's", fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
    axes[0][0].legend(fontsize=7, ncol=2)
    env = result["environment"]
    fig.suptitle(
        f"images/s relative to default mode{' (dashed: MPVG target)' if targets else ''} - "
        f"{env.get('gpu') or env['cpu']}, {env['threads']} thread(s), "
        f"torch {env['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``name``.json, .md and .png under ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    paths = [
        harness.write_json(out_dir / f"{name}.json", result),
        harness.write_text(out_dir / f"{name}.md", to_markdown(result)),
        out_dir / f"{name}.png",
    ]
    plot(result, paths[2])
    return paths


# ----------------------------------------------------------------------------------------------- driver


def _flag(name: str) -> str:
    """The ``mpvg bench`` flag of a :class:`BenchConfig` field (its first option string)."""
    f = next(f for f in fields(BenchConfig) if f.name == name)
    return f.metadata.get("flags", (f"--{name.replace('_', '-')}",))[0]


#: the smallest value that gives a measurement, per numeric field
MINIMUMS = {"batch_infer": 1, "batch_train": 1, "warmup": 0, "rounds": 1, "iters": 1, "min_sample_s": 0,
            "max_inner": 1, "threads": 1}


def _check(cfg: BenchConfig) -> None:
    """Refuse, before any work, settings that cannot give a measurement: a :class:`UserError` naming the flag and
    the value (unknown model, PE mode, implementation, execution mode or task; sizes and counts below their
    minimum)."""
    from ..errors import UserError
    from ..models import list_models

    known_models = list_models()
    for field_name, names in (("models", cfg.models), ("compile_models", cfg.compile_models),
                              ("batch_overrides", list(cfg.batch_overrides))):
        for m in names:
            if m not in known_models:
                raise UserError(f"{_flag(field_name)}: unknown model {m!r}; choose from {', '.join(known_models)}")
    if not cfg.models:
        raise UserError(f"{_flag('models')}: no model given")
    for field_name, values, known in (("pes", cfg.pes, PE_MODES), ("compile_pes", cfg.compile_pes, PE_MODES),
                                      ("impls", cfg.impls, IMPLS), ("compile_impls", cfg.compile_impls, IMPLS),
                                      ("execs", cfg.execs, EXECS), ("tasks", cfg.tasks, TASKS),
                                      ("compile_tasks", cfg.compile_tasks, TASKS)):
        for v in values:
            if v not in known:
                raise UserError(f"{_flag(field_name)}: {v!r} is not one of {', '.join(known)}")
    for field_name, minimum in MINIMUMS.items():
        value = getattr(cfg, field_name)
        if not isinstance(value, (int, float)) or value != value or value < minimum:
            raise UserError(f"{_flag(field_name)} {value}: must be at least {minimum}")
    for m, sizes in cfg.batch_overrides.items():
        if len(tuple(sizes)) != 2 or any(int(b) < 1 for b in sizes):
            raise UserError(f"{_flag('batch_overrides')} {m}={','.join(str(b) for b in sizes)}: batch sizes must "
                            "be at least 1")


def _setup(device: torch.device, threads: int) -> None:
    """Malloc settings (CPU; the harness's, in-process) and the CPU thread count."""
    if device.type == "cpu":
        harness.tune_malloc()
    torch.set_num_threads(threads)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every case of ``cfg`` (model by model, interleaved within a model) and write the result files."""
    _check(cfg)
    cfg, device = resolve(cfg)
    _setup(device, cfg.threads)
    if "fused" in cfg.impls and backends.resolve_backend(device) == "torch":
        print(
            f"warning: the fused implementation resolves to backend 'torch' on {device.type} (C++ backend: "
            f"{backends.cpp_status()[1] or 'loaded'}); fused and unfused then differ only by the PE cache",
            file=sys.stderr,
        )
    per_case = cfg.warmup + cfg.rounds
    total = per_case * sum(
        cfg.wants(m, pe, i, e, t)
        for m in cfg.models
        for pe in cfg.pes
        for i in cfg.impls
        for e in cfg.execs
        for t in cfg.tasks
    )
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="mpvg bench", unit="call", file=sys.stderr, dynamic_ncols=True)
    cases: list[Case] = []
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    try:
        # many compiled wrappers share one forward code object: keep dynamo from falling back to eager
        with harness.recompile_limit(64):
            for name in cfg.models:
                cases += run_model(name, cfg, bar, device)
                if "compile" in cfg.execs:
                    torch._dynamo.reset()
    finally:
        if bar is not None:
            bar.close()
    records = summarise(cases)
    result = {
        "config": cfg.record(),
        "environment": harness.environment(device),
        "wall_s": time.perf_counter() - t0,
        "loadavg_1m_start": load_start,
        "records": records,
        "targets": applicable_targets(device),
        "ratios": ratios(records, targets=applicable_targets(device)),
        "speedups": speedups(records),
    }
    write_results(result, Path(cfg.out_dir), cfg.name)
    return result


def profile_model(name: str, cfg: BenchConfig, top: int = 12, device: torch.device | str = "cpu") -> str:
    """Where the time goes: ``torch.profiler`` op tables of every (mode, impl, task) case, eager, as Markdown.

    Each case is warmed up, then profiled over ``cfg.rounds`` calls; the table lists the ops with the largest self
    CPU time, and a summary line gives the share of LayerNorm-family ops (``mpvg::*``, ``aten::layer_norm`` and
    the reference's elementwise ops) next to the total.
    """
    from torch.profiler import ProfilerActivity, profile

    sub = replace(cfg, execs=["eager"], progress=False)
    lines = [f"## Profile: {SHORT_NAMES.get(name, name)} (`{name}`), eager, {cfg.rounds} call(s) per case", ""]
    for case in make_cases(name, sub, device):
        for _ in range(max(cfg.warmup, 1)):
            case.run()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(cfg.rounds):
                case.run()
            harness.sync(device)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        ln = sum(
            e.self_cpu_time_total
            for e in events
            if e.key.startswith("mpvg::") or "layer_norm" in e.key or "native_layer_norm" in e.key
        )
        lines += [
            f"### {case.pe} / {case.impl} / {case.task} (B={case.batch}): "
            f"{total / 1e3 / cfg.rounds:.1f} ms self CPU per call, LayerNorm ops {ln / max(total, 1):.1%}",
            "",
        ]
        rows = [
            {
                "op": f"`{e.key}`",
                "calls": f"{e.count / cfg.rounds:.0f}",
                "ms": f"{e.self_cpu_time_total / 1e3 / cfg.rounds:.2f}",
                "share": f"{e.self_cpu_time_total / max(total, 1):.1%}",
            }
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
        ]
        cols = [("op", "op"), ("calls", "calls/call"), ("ms", "self CPU ms/call"), ("share", "share")]
        lines += [harness.markdown_table(rows, cols, right=("calls", "ms", "share")), ""]
        case.run = lambda: None
    return "\n".join(lines)


def smoke_config(out_dir: str = "benchmarks/results", name: str = "models_smoke") -> BenchConfig:
    """A run of well under a minute: the small digits model, eager only, few iterations."""
    return BenchConfig(
        models=["vit_digits"],
        execs=["eager"],
        batch_infer=32,
        batch_train=32,
        warmup=2,
        rounds=5,
        iters=1,
        min_sample_s=0.02,
        out_dir=out_dir,
        name=name,
    )


def run_and_report(cfg: BenchConfig, profile: bool = False) -> int:
    """What ``mpvg bench`` does: run, write the files, print the Markdown summary; the exit status (1 when a case
    failed). ``profile``: instead of timing, write ``NAME_profile.md`` with torch.profiler tables. A device that
    is not there (``cuda`` without CUDA) is a :class:`UserError`."""
    if profile:
        _check(cfg)
        cfg, device = resolve(cfg)
        _setup(device, cfg.threads)
        text = "\n".join(profile_model(m, cfg, device=device) for m in cfg.models)
        path = harness.write_text(
            Path(cfg.out_dir) / f"{cfg.name}_profile.md",
            f"# torch.profiler tables ({torch.get_num_threads()} thread(s))\n\n" + text,
        )
        print(text)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    result = run_bench(cfg)
    print(to_markdown(result))
    name = result["config"]["name"]
    print(f"wrote {Path(cfg.out_dir) / (name + '.json')}, .md, .png in {result['wall_s']:.0f} s", file=sys.stderr)
    return 1 if any(r["error"] for r in result["records"]) else 0
