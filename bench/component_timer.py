"""Where a gpt-oss training step spends its time: per component, per phase, from module hooks.

Attach :class:`ComponentTimer` to a gpt-oss model (transformers' ``GptOssForCausalLM``, bare,
under peft or inside OpenRLHF's ``Actor``, with or without DeepSpeed) and run one training step
or one log-prob forward inside ``timer.pass_(...)``. Hooks record an event at the edges of every
component call:

* components: ``attention`` (``GptOssAttention``: q/k/v/o with their LoRA, rotary, the kernel),
  ``router`` (``GptOssTopKRouter``), ``experts`` (``GptOssExperts``), ``norms`` (the two
  ``GptOssRMSNorm`` of a layer), ``layer`` (the whole decoder layer; ``layer_other`` is what the
  layer spends outside the four: residual adds, hooks, glue), and outside the layers ``lm_head``
  (final norm and output projection) and ``log_prob`` (from the logits to the end of the
  forward: fp32 cast, log-softmax, gather; in a training step its backward includes the loss's);
* phases: ``forward``, ``recompute`` (a forward run again inside the backward, as reentrant
  gradient checkpointing does), ``backward`` (from the moment the gradient of a component's
  output exists to the moment the gradient of its inputs does), and ``logprob`` for a forward
  under ``no_grad`` (the old and reference log-probs);
* with ``zero3=True``, DeepSpeed ZeRO-3's fetch and release of a module's partitioned
  parameters (``PartitionedParameterCoordinator.fetch_sub_module`` / ``release_sub_module``),
  labelled ``forward``, ``backward`` (the backward and its recompute) or ``logprob``.

On CUDA the edges are CUDA events on the current stream, so the figures are GPU time between
two points of the stream, and the hooks never synchronize; on CPU they are wall-clock times.
A backward interval may hold kernels of neighbouring branches that autograd runs in between
(the residual stream's additions), so the backward figures are upper bounds of a component's
own work. Per component the report also gives the peak memory allocated above the level at its
start, in the forward phases (CUDA only; the timer resets the allocator's peak counter, so run it
in a pass of its own, after any measurement that reads that counter).

Figures are per layer: the mean over the model's decoder layers of each component's time in a
phase (a layer's two norms summed). Bench-only code: the training path never imports it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

LAYER_COMPONENTS = {
    "GptOssAttention": "attention",
    "GptOssTopKRouter": "router",
    "GptOssExperts": "experts",
    "GptOssRMSNorm": "norms",
    "GptOssDecoderLayer": "layer",
}
"""transformers 4.57.6's gpt-oss module classes, and the component each is counted under."""
PHASES = ("forward", "recompute", "backward", "logprob")
IN_LAYER = ("attention", "router", "experts", "norms")


def in_backward() -> bool:
    """True while autograd's engine runs a backward on this thread (a recompute included)."""
    return torch._C._current_graph_task_id() != -1


class _Clock:
    """CUDA events on the current stream, or wall-clock seconds on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


@dataclass
class _Span:
    component: str
    phase: str
    layer: int | None
    start: object
    ends: list = field(default_factory=list)
    peak_gib: float = float("nan")


class ComponentTimer:
    """Hooks that time each component of a gpt-oss model; see the module's docstring."""

    def __init__(self, model: torch.nn.Module, cuda: bool | None = None, zero3: bool = False):
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.clock = _Clock(self.cuda)
        self.spans: list[_Span] = []
        self.marks: dict[str, object] = {}
        self.mode: str | None = None
        self._handles: list = []
        self._restore: list = []
        self._entry_mem: dict[int, int] = {}
        self.layers = self._attach(model)
        if zero3:
            self._wrap_zero3()

    # -- attaching ------------------------------------------------------------------------------
    def _attach(self, model: torch.nn.Module) -> int:
        layer_of: dict[int, int] = {}
        layers = 0
        for name, module in model.named_modules():
            kind = type(module).__name__
            if kind == "GptOssDecoderLayer":
                for sub in module.modules():
                    layer_of[id(sub)] = layers
                layers += 1
        for name, module in model.named_modules():
            kind = type(module).__name__
            if kind in LAYER_COMPONENTS and id(module) in layer_of:
                self._hook(module, LAYER_COMPONENTS[kind], layer_of[id(module)])
            elif name.endswith("lm_head"):
                self._hook(module, "lm_head", None)
                self._handles.append(module.register_forward_hook(self._logits_ready))
            elif kind == "GptOssRMSNorm":  # the final norm, outside the layers
                self._hook(module, "lm_head", None)
        if not layers:
            raise ValueError("ComponentTimer: no GptOssDecoderLayer in the model")
        return layers

    def _hook(self, module: torch.nn.Module, component: str, layer: int | None) -> None:
        def pre(mod, args, kwargs):
            if self.mode is None:
                return None
            phase = self._forward_phase()
            span = _Span(component, phase, layer, self.clock.mark())
            self._open(mod, span)
            if phase != "recompute" and not (phase == "forward" and torch.is_grad_enabled()):
                return None
            # the inputs' gradients end this component's backward: hook fresh views of them
            back = _Span(component, "backward", layer, None)
            self.spans.append(back)
            mod._rft_timer_back = back
            return self._views(args, back), self._views(kwargs, back)

        def post(mod, args, kwargs, output):
            if self.mode is None or not hasattr(mod, "_rft_timer_span"):
                return None
            span = mod._rft_timer_span
            del mod._rft_timer_span
            span.ends.append(self.clock.mark())
            if id(span) in self._entry_mem:
                span.peak_gib = (torch.cuda.max_memory_allocated() - self._entry_mem.pop(id(span))) / 2**30
            back = getattr(mod, "_rft_timer_back", None)
            if back is not None:
                del mod._rft_timer_back
                first = _first_tensor(output)
                if first is not None and first.requires_grad:
                    first.register_hook(self._backward_start(back))
            return None

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _open(self, mod: torch.nn.Module, span: _Span) -> None:
        self.spans.append(span)
        mod._rft_timer_span = span
        if self.cuda and span.component != "layer":  # a layer's components reset the counter inside it
            torch.cuda.reset_peak_memory_stats()
            self._entry_mem[id(span)] = torch.cuda.memory_allocated()

    def _views(self, values, back: _Span):
        def swap(value):
            if isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point():
                view = value.view_as(value)
                view.register_hook(self._backward_end(back))
                return view
            return value

        if isinstance(values, dict):
            return {k: swap(v) for k, v in values.items()}
        return tuple(swap(v) for v in values)

    def _backward_start(self, back: _Span):
        def hook(grad):
            back.start = self.clock.mark()

        return hook

    def _backward_end(self, back: _Span):
        def hook(grad):
            back.ends.append(self.clock.mark())

        return hook

    def _logits_ready(self, mod, args, output) -> None:
        if self.mode is not None:
            self.marks["logits"] = self.clock.mark()
            if self.mode == "train" and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._mark_hook("logits_grad"))

    def _mark_hook(self, key: str):
        def hook(grad):
            self.marks[key] = self.clock.mark()

        return hook

    def _forward_phase(self) -> str:
        if self.mode == "logprob":
            return "logprob"
        return "recompute" if in_backward() else "forward"

    def _wrap_zero3(self) -> None:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coord

        for method in ("fetch_sub_module", "release_sub_module"):
            original = getattr(Coord, method)
            label = "zero3_fetch" if method.startswith("fetch") else "zero3_release"

            def timed(coord, *args, _original=original, _label=label, **kwargs):
                if self.mode is None:
                    return _original(coord, *args, **kwargs)
                phase = "logprob" if self.mode == "logprob" else ("backward" if in_backward() else "forward")
                span = _Span(_label, phase, None, self.clock.mark())
                self.spans.append(span)
                try:
                    return _original(coord, *args, **kwargs)
                finally:
                    span.ends.append(self.clock.mark())

            setattr(Coord, method, timed)
            self._restore.append((Coord, method, original))

    def remove(self) -> None:
        """Take every hook off (and DeepSpeed's coordinator back to its own methods)."""
        for handle in self._handles:
            handle.remove()
        for owner, method, original in self._restore:
            setattr(owner, method, original)
        self._handles, self._restore = [], []

    # -- measuring --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pass_(self, mode: str) -> Iterator[None]:
        """Record one ``train`` step (forward, loss, backward) or one ``logprob`` forward.

        In a training pass call :meth:`loss_ready` between the loss and its backward."""
        if mode not in ("train", "logprob"):
            raise ValueError(f"mode {mode!r}: use train or logprob")
        self.spans, self.marks, self._entry_mem, self.mode = [], {}, {}, mode
        self.marks["start"] = self.clock.mark()
        try:
            yield
        finally:
            self.marks["end"] = self.clock.mark()
            self.mode = None
            if self.cuda:
                torch.cuda.synchronize()

    def loss_ready(self) -> None:
        """The forward (loss included) ends and the backward begins here."""
        self.marks["loss"] = self.clock.mark()

    def report(self) -> dict:
        """The last pass's figures: ms per layer and peak GiB per component and phase, the head, ZeRO-3."""
        return summarize_spans(self.spans, self.marks, self.layers, self.clock.ms)


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def summarize_spans(spans: list[_Span], marks: dict, layers: int, ms) -> dict:
    """Sum the closed spans by component and phase; per-layer components are divided by ``layers``."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    peaks: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls: dict[str, int] = defaultdict(int)
    for span in spans:
        if span.start is None or not span.ends:
            continue
        elapsed = max(ms(span.start, end) for end in span.ends)
        totals[span.component][span.phase] += elapsed
        calls[span.component] += 1
        if span.peak_gib == span.peak_gib:  # not NaN
            peaks[span.component][span.phase] = max(peaks[span.component][span.phase], span.peak_gib)
    per_layer = {c: {p: v / layers for p, v in totals[c].items()} for c in (*IN_LAYER, "layer") if c in totals}
    if "layer" in per_layer:
        per_layer["layer_other"] = {
            phase: per_layer["layer"][phase] - sum(per_layer.get(c, {}).get(phase, 0.0) for c in IN_LAYER)
            for phase in per_layer["layer"]
        }
    head = {"lm_head": dict(totals.get("lm_head", {}))}
    if "logits" in marks and "loss" in marks:
        head["log_prob"] = {"forward": ms(marks["logits"], marks["loss"])}
    elif "logits" in marks:
        head["log_prob"] = {"logprob": ms(marks["logits"], marks["end"])}
    if "loss" in marks and "logits_grad" in marks:
        head.setdefault("log_prob", {})["backward"] = ms(marks["loss"], marks["logits_grad"])
    zero3 = {c: dict(totals[c]) for c in ("zero3_fetch", "zero3_release") if c in totals}
    return {
        "layers": layers,
        "per_layer_ms": per_layer,
        "head_ms": head,
        "zero3_ms_whole_model": zero3,
        "peak_gib_above_entry": {c: dict(v) for c, v in peaks.items()},
        "calls": dict(calls),
        "pass_ms": ms(marks["start"], marks["end"]),
    }


def measure_passes(timer: ComponentTimer, train_step: Callable[[], object], logprob_step: Callable[[], object],
                   passes: int = 3, after_train: Callable[[], dict | None] | None = None) -> dict:
    """``passes`` training steps and log-prob forwards under ``timer``; every figure the median
    over the passes (:func:`median_report`).

    ``train_step`` runs one step and calls ``timer.loss_ready()`` before its backward;
    ``after_train`` runs outside the pass (an optimizer step, say) and may return figures to add
    to that pass's report."""
    trains, logprobs = [], []
    for _ in range(passes):
        with timer.pass_("train"):
            train_step()
        trains.append(timer.report())
        extra = after_train() if after_train is not None else None
        if extra:
            trains[-1].update(extra)
        with timer.pass_("logprob"):
            logprob_step()
        logprobs.append(timer.report())
    return {"train": median_report(trains), "logprob": median_report(logprobs)}


def median_report(reports: list[dict]) -> dict:
    """Several passes' reports as one: every number is the median over the passes that have it."""
    first = reports[0]
    if isinstance(first, dict):
        keys = {k for r in reports for k in r}
        return {k: median_report([r[k] for r in reports if k in r]) for k in sorted(keys)}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        values = sorted(reports)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return first


def format_report(report: dict, title: str) -> str:
    """A table of the report: one row per component, one column per phase."""
    lines = [f"{title} (ms per layer, mean over {report['layers']} layers; pass {report['pass_ms']:.1f} ms)"]
    phases = [p for p in PHASES if any(p in v for v in report["per_layer_ms"].values())]
    lines.append(f"  {'component':14s}" + "".join(f"{p:>11s}" for p in phases) + f"{'peak GiB':>10s}")
    for component, by_phase in report["per_layer_ms"].items():
        peak = max(report["peak_gib_above_entry"].get(component, {}).values(), default=float("nan"))
        lines.append(f"  {component:14s}" + "".join(f"{by_phase.get(p, float('nan')):11.2f}" for p in phases)
                     + f"{peak:10.2f}")
    for component, by_phase in {**report["head_ms"], **report["zero3_ms_whole_model"]}.items():
        cells = "".join(f"{by_phase.get(p, float('nan')):11.2f}" for p in phases)
        lines.append(f"  {component:14s}{cells}   (whole model)")
    return "\n".join(lines)
