"""INT8 ONNX that keeps the mask: static QDQ quantisation on the model's own grid, its inputs equalised, and
the convolutions that hurt the mask most kept in float, measured at export.

ONNX Runtime's ``quantize_static`` in QDQ format: per-channel symmetric INT8 weights, asymmetric UINT8
activations with asymmetric calibrated ranges (ONNX Runtime's percentile calibrator makes symmetric ranges
unless told otherwise, which wastes half the codes of a PReLU output: ``CalibTensorRangeSymmetric`` False).
Every choice below was measured on the shipped kidney-synth model (16 filters, 2.5 mm), as mask Dice of
the INT8 graph against the FP32 graph on the network inputs of the real validation CTs (example_ct_sm and
example_ct) and of 20 held-out anatomy phantoms (seed 77), all on the model's grid; the graph of
kidney-synth's bundle before this module (classic phantoms at half resolution, percentile 99.999 with
symmetric ranges) gave 0.966 on the real CTs:

1. **Calibration on the model's grid** (:func:`model_grid_slices`): anatomy phantoms resampled to the
   model's pixel spacing through the runtime's own preprocessing (:func:`qnkit.inference.to_model_input`),
   the slices around the kidneys plus some across the body (what the kidney slab and the coarse pass
   feed). MinMax: 0.976 -> 0.986 on the real CTs (phantoms 0.978 -> 0.984).
2. **Weights are not the problem, activations are**: INT8 weights alone (per channel, activations float)
   give 0.999; FP16 gives 0.9997. A convolution's 8-bit input (a PReLU of a folded batch norm whose
   channels have ranges 2-3x apart) is most of the error: quantising only the inputs gives 0.989.
3. **Input equalisation** (:func:`equalise_inputs`, SmoothQuant's migration on the block's own algebra): each
   quantised convolution reads ``PReLU(s * x + t)`` with a per-channel affine ``s, t`` (the folded batch
   norm) and one PReLU slope, so ``conv(W, PReLU(s*x + t)) = conv(W / f, PReLU(f*s*x + f*t))`` exactly for
   any per-input-channel f > 0. With ``f_c = (max_c' r_c' / r_c) ** 0.5`` (r_c: channel c's largest
   magnitude on the calibration slices) the channels share the 8-bit range more evenly, half of the
   imbalance going to the weights, which have room. The FP32 graph is unchanged to float rounding
   (its mask Dice against the original 1.0). Percentile 99.99: 0.985 -> 0.992 on the real CTs (phantoms
   0.986 -> 0.990); with f = the full ratio (alpha 1) the weights take too much: 0.975.
4. **Calibration method**: MinMax, percentile 99.99 (asymmetric) and entropy were measured; entropy was the
   worst (0.963), percentile 99.999 lets rare extreme activations set the scale (0.981), and 99.9 clips the
   kidney's own strongest responses (with the old calibration slices: 0.959, masks 8 % smaller). Export calibrates with each of
   :data:`CALIBRATIONS` and keeps the one that agrees best on the tuning phantoms.
5. **Which layers can be quantised**: the k x k convolutions (95.5 % of the network's FLOPs) except the first
   (one input channel: it reads the raw image). Each group below was added to the 17 k x k convolutions
   (equalised, percentile 99.99: real CTs 0.992, phantoms 0.990) and measured: the first convolution 0.989
   / 0.986, the 1 x 1 dense-block convolutions 0.984 / 0.982, the SE blocks' sSE convolutions and cSE Gemms
   0.985 / 0.978 (one phantom 0.77), the SE gates' sigmoids and multiplies 0.965 / 0.970, the folded batch
   norms and PReLUs 0.748 / 0.769, the max-unpooling's Max/Equal/Where 0.757 / 0.804 (tie decisions on
   quantised values move whole pooling windows); the classifier with the output sigmoid costs nothing
   (0.992 / 0.990) but holds 0.01 % of the FLOPs. All of these stay in float.
6. **Per-layer sensitivity, and forward selection** (:func:`sensitivity_search`): each candidate is quantised
   alone and scored on tuning phantoms (other seeds than the calibration's and the evidence's); then, most
   FLOPs per loss of Dice first, each joins the INT8 set if the set keeps :data:`TARGET_DICE` pooled and
   :data:`CASE_FLOOR` on every tuning phantom (both on the model's grid, which is stricter than the
   runtime's output: its upsampling and post-processing raise the agreement); the rest stays in float.
   The table, every step and every layer kept in float with the reason go into the bundle
   (``export.int8``), and `qnkit verify` prints them. On kidney-synth this keeps 6 of 17 convolutions in
   INT8, 64 % of the FLOPs (the full-resolution decoder's two, decoders.2.conv2, decoders.0.conv1 and the
   bottleneck's two): mask Dice against FP32 through `qnkit segment` 0.997 on both real CTs, 20 held-out
   phantoms mean 0.997, worst 0.995 (with the floor at 0.99: 42 % of the FLOPs, worst phantom 0.995; the
   17 all in INT8 give, on the model's grid, 0.992 on the real CTs but 0.978 on the worst phantom). A
   backward search instead (the most sensitive alone kept in float first, stopping at half the FLOPs)
   kept 8 of 17 in float for 66 % and still left two phantoms at 0.990: the layers' errors add up,
   no single layer is the culprit.

Quantisation-aware fine-tuning (fake-quantised weights and activations in training, a few hundred steps
from the trained weights at a low learning rate) is the next step where this is not enough; it needs the
training run and is not part of export.

The graph is meant for ONNX Runtime on the CPU (the int8 kernels give the same masks as the float QDQ
arithmetic: checked with graph optimisations off); TensorRT's explicit quantisation wants symmetric
activations, and qnkit's GPU path is TensorRT FP16.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

#: Phantom seeds of the calibration slices and of the tuning slices the sensitivity search scores on; other
#: seeds than the training's (kidney-synth 1, kidney-synth-4 5) and the INT8 evidence phantoms' (77).
CALIBRATION_SEED, TUNING_SEED = 2718, 3141
#: (name, ONNX Runtime calibration method, percentile or None): each is tried, the best on the tuning set kept.
CALIBRATIONS = (("percentile 99.99", "Percentile", 99.99), ("minmax", "MinMax", None))
#: SmoothQuant's migration strength: f_c = (max range / channel range) ** EQUALISE_ALPHA (0: off).
EQUALISE_ALPHA = 0.5
#: Mask Dice against FP32 the INT8 set must keep on the tuning phantoms (on the model's grid, before the
#: runtime's upsampling and post-processing, which raise it), pooled and on the worst case; the CPU-default
#: bar on the evidence is 0.99 on each real CT and each phantom.
TARGET_DICE = 0.995
CASE_FLOOR = 0.985
#: Under this share of the network's FLOPs in INT8, the record says post-training quantisation is not enough.
MIN_INT8_SHARE = 0.5


@dataclass(frozen=True)
class ModelGrid:
    """How the runtime feeds the model (qnkit.segment): HU window, pixel spacing (None: half resolution), padding,
    and the context planes per slice ((1, None) for a 2-D model; :func:`qnkit.inference.model_context`)."""

    hu_window: tuple[float, float]
    model_spacing: float | None
    pad_multiple: int
    context: tuple = (1, None)


def model_grid_slices(grid: ModelGrid, *, seed: int, cases: int, per_case: int,
                      log: Callable[[str], None] = lambda _: None) -> list[np.ndarray]:
    """Network inputs (float32 (n, C, h, w), one array per case) of `cases` anatomy phantoms of `seed`.

    Each phantom goes through the runtime's preprocessing (:func:`qnkit.inference.model_input_slices`: HU
    window, resampling to the model's pixel spacing, a 2.5-D model's context planes; padding to
    ``pad_multiple``). Three quarters of a case's slices are spread over its kidneys and 10 slices around
    them (the kidney slab ``qnkit segment`` predicts), a quarter over the whole volume (its coarse pass).
    """
    from qnkit import inference, kernels
    from qnkit.synth.case import make_anatomy_case

    out = []
    for index in range(cases):
        log(f"INT8: phantom {index + 1}/{cases} of seed {seed} on the model's grid...")
        case = make_anatomy_case(index, seed=seed)
        depth = len(case.segmentation)
        span = kernels.kidney_slice_range(case.segmentation, margin=10) or (0, depth)
        near = np.linspace(span[0], span[1] - 1, max(1, per_case - per_case // 4))
        across = np.linspace(0, depth - 1, per_case // 4)
        picks = np.unique(np.concatenate([near, across]).round().astype(int))
        pixel = float(case.meta["pixel_spacing"])
        image = inference.model_input_slices(np.ascontiguousarray(case.imaging), picks, hu_window=grid.hu_window,
                                             spacing_hw=(pixel, pixel), model_spacing=grid.model_spacing,
                                             slice_mm=float(np.linalg.norm(case.affine[:3, 0])), context=grid.context)
        out.append(inference.network_batch(image, grid.pad_multiple))
    return out


def _module_name(node) -> str:
    """The PyTorch module a node came from (the exporter's name scopes), e.g. model.decoders.3.conv1."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            named = [s for s in scopes if s.startswith("model.")]
            if named:
                return named[-1][len("model."):]
    return node.name


def candidate_convolutions(model) -> tuple[list[str], dict[str, str]]:
    """(Conv nodes to consider for INT8, {Conv node kept in float: why}) of an FP32 ONNX model (see rule 5)."""
    graph = model.graph
    weights = {init.name: list(init.dims) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    candidates, kept = [], {}
    for position, node in enumerate(convs):
        dims = weights.get(node.input[1], [0, 0, 1, 1])
        if position == 0 or dims[1] == 1:
            kept[node.name] = "first convolution: one input channel, reads the raw image"
        elif position == len(convs) - 1:
            kept[node.name] = "classifier: its output is thresholded into the mask"
        elif int(np.prod(dims[2:])) == 1:
            kept[node.name] = ("1x1 convolution (dense-block fusion or SE gate): as sensitive as the worst kxk "
                               "convolution for under 5 % of the FLOPs")
        else:
            candidates.append(node.name)
    return candidates, kept


def equalise_inputs(model, conv_names, batches: list[np.ndarray], alpha: float = EQUALISE_ALPHA,
                    input_name: str = "image"):
    """A copy of `model` whose convolutions in `conv_names` read equalised inputs (rule 3); (model, names done).

    Only a convolution whose input is ``activation(Add(Mul(x, scale), shift))`` with a positively
    homogeneous activation (LeakyRelu, Relu), constant per-channel scale and shift, and every tensor and
    constant of that chain used by it alone, is rewritten; others are left as they are.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from qnkit.backends.onnxruntime_backend import session_options

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def single(name: str, op_types) -> object | None:
        node = producer.get(name)
        return node if node is not None and node.op_type in op_types and uses.get(name) == 1 else None

    chains = {}
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.name not in conv_names or uses.get(conv.input[1]) != 1:
            continue
        act = single(conv.input[0], ("LeakyRelu", "Relu"))
        add = act and single(act.input[0], ("Add",))
        mul = add and single(add.input[0], ("Mul",))
        if not mul or add.input[1] not in inits or mul.input[1] not in inits:
            continue
        if uses.get(add.input[1]) != 1 or uses.get(mul.input[1]) != 1 or conv.input[1] not in inits:
            continue
        channels = list(inits[conv.input[1]].dims)[1]
        if int(np.prod(inits[mul.input[1]].dims)) != channels or int(np.prod(inits[add.input[1]].dims)) != channels:
            continue
        chains[conv.name] = (conv, mul, add)
    if not chains or alpha <= 0:
        return model, []
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    del probe.graph.output[:]
    tensors = [conv.input[0] for conv, _, _ in chains.values()]
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    largest: dict[str, np.ndarray] = {}
    for batch in batches:
        for name, value in zip(tensors, session.run(tensors, {input_name: batch})):
            magnitude = np.abs(value).max(axis=(0, 2, 3))
            largest[name] = np.maximum(largest[name], magnitude) if name in largest else magnitude
    for conv, mul, add in chains.values():
        ranges = np.maximum(largest[conv.input[0]].astype(np.float64), 1e-6)
        factor = (ranges.max() / ranges) ** alpha
        for init in (inits[mul.input[1]], inits[add.input[1]]):
            value = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((value * factor.reshape(value.shape)).astype(value.dtype), init.name))
        weight = numpy_helper.to_array(inits[conv.input[1]])
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(
            (weight / factor.reshape(1, -1, 1, 1)).astype(weight.dtype), conv.input[1]))
    return model, sorted(chains)


class _Batches:
    """An ONNX Runtime calibration reader over a list of batches; ranges of it (``set_range``) let the
    calibrator fold one batch at a time into its histograms instead of holding every activation."""

    def __init__(self, batches: list[np.ndarray], input_name: str):
        self.batches, self.input_name = batches, input_name
        self.start, self.end, self.position = 0, len(batches), 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.position = start_index, min(end_index, len(self.batches)), start_index

    def get_next(self):
        if self.position >= self.end:
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def __iter__(self):
        for batch in self.batches:
            yield {self.input_name: batch}


def _batched(slices: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(case[i:i + batch_size]) for case in slices for i in range(0, len(case), batch_size)]


class Quantiser:
    """One FP32 graph, calibrated once per method (ranges cached in a folder), quantised with any node set."""

    def __init__(self, fp32_path: Path, workdir: Path, calibration: list[np.ndarray], input_name: str = "image"):
        self.fp32_path, self.workdir, self.input_name = Path(fp32_path), Path(workdir), input_name
        self.batches = _batched(calibration, 8)

    def _options(self, calibration: tuple) -> tuple:
        from onnxruntime.quantization import CalibrationMethod

        name, method, percentile = calibration
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibTensorRangeSymmetric": False,
                 "CalibStridedMinMax": 1}  # one batch at a time into the calibrator (any method)
        if percentile is not None:
            extra["CalibPercentile"] = percentile
        return getattr(CalibrationMethod, method), extra, self.workdir / f"ranges-{name.replace(' ', '-')}.json"

    def quantise(self, out_path: Path, nodes: list[str], calibration: tuple) -> Path:
        """Write the QDQ graph with `nodes` (Conv names) in INT8 to `out_path`; calibrates on first use."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        from .onnx_export import _quiet

        method, extra, cache = self._options(calibration)
        reader = None if cache.is_file() else _Batches(self.batches, self.input_name)
        with _quiet():
            quantize_static(str(self.fp32_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, op_types_to_quantize=["Conv"], nodes_to_quantize=list(nodes),
                            extra_options=extra, calibration_cache_path=str(cache))
        return Path(out_path)


class Agreement:
    """Mask Dice of a graph against the FP32 graph's masks on fixed slices: pooled over all of them, and the
    worst of the cases (each case's slices pooled)."""

    def __init__(self, fp32_path: Path, slices: list[np.ndarray], threshold: float, input_name: str = "image"):
        self.cases = [_batched([case], 4) for case in slices]
        self.threshold, self.input_name = threshold, input_name
        self.reference = self.masks(fp32_path)

    def masks(self, path: Path) -> list[list[np.ndarray]]:
        import onnxruntime as ort

        from qnkit.backends.onnxruntime_backend import session_options

        session = ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])
        return [[session.run(None, {self.input_name: batch})[0] > self.threshold for batch in case]
                for case in self.cases]

    def dice(self, path: Path) -> tuple[float, float]:
        """(pooled mask Dice, worst case's mask Dice) of the graph at `path` against FP32's."""
        pooled, worst = [0, 0], 1.0
        for reference_case, case in zip(self.reference, self.masks(path)):
            overlap = sum(int(np.count_nonzero(r & m)) for r, m in zip(reference_case, case))
            total = sum(int(np.count_nonzero(r)) + int(np.count_nonzero(m)) for r, m in zip(reference_case, case))
            pooled[0] += 2 * overlap
            pooled[1] += total
            if total:
                worst = min(worst, 2.0 * overlap / total)
        return (1.0 if pooled[1] == 0 else pooled[0] / pooled[1]), worst


def sensitivity_search(quantiser: Quantiser, agreement: "Agreement", candidates: list[str], flops: dict[str, int],
                       calibration: tuple, *, target: float = TARGET_DICE, case_floor: float = CASE_FLOOR,
                       log: Callable[[str], None] = lambda _: None) -> dict:
    """Per-layer sensitivity, then the INT8 set chosen by forward selection (rule 6); returns the table, the
    steps and the INT8 node set.

    Each candidate is first quantised alone (its mask Dice against FP32 on the tuning slices). Then, in order of
    FLOPs per loss of Dice (the most arithmetic for the least damage first), each is added to the INT8 set
    if the set with it still agrees at `target` (pooled over the tuning slices) and at `case_floor` on every
    tuning case; otherwise it stays in float. One quantisation and one scoring per candidate per pass.
    """
    workdir = quantiser.workdir
    total = sum(flops.values())
    table = []
    for name in candidates:
        dice, _ = agreement.dice(quantiser.quantise(workdir / "alone.onnx", [name], calibration))
        table.append({"node": name, "dice_alone": round(dice, 5), "flops_share": round(flops.get(name, 0) / total, 4)})
        log(f"INT8 sensitivity: {name} alone: mask Dice {dice:.4f}")
    value = {row["node"]: row["flops_share"] / max(1e-4, 1.0 - row["dice_alone"]) for row in table}
    order = sorted(candidates, key=lambda name: -value[name])
    quantised: list[str] = []
    dice, worst_case = 1.0, 1.0
    steps = []
    for name in order:
        trial = quantised + [name]
        trial_dice, trial_worst = agreement.dice(quantiser.quantise(workdir / "search.onnx", trial, calibration))
        accepted = trial_dice >= target and trial_worst >= case_floor
        steps.append({"node": name, "dice": round(trial_dice, 5), "worst_case_dice": round(trial_worst, 5),
                      "int8_flops_share": round(_share(trial, flops), 4), "accepted": accepted})
        log(f"INT8 search: + {name}: mask Dice {trial_dice:.4f} (worst case {trial_worst:.4f}), "
            f"{_share(trial, flops):.0%} of the FLOPs in INT8: {'kept in INT8' if accepted else 'left in float'}")
        if accepted:
            quantised, dice, worst_case = trial, trial_dice, trial_worst
    return {"table": table, "steps": steps, "quantised": [n for n in candidates if n in quantised], "dice": dice,
            "worst_case_dice": worst_case}


def _share(nodes: list[str], flops: dict[str, int]) -> float:
    total = sum(flops.values())
    return sum(flops.get(n, 0) for n in nodes) / total if total else 0.0


def quantize_int8(fp32_path: Path, out_path: Path, grid: ModelGrid, *, threshold: float = 0.5, search: bool = True,
                  calibration_cases: int = 3, tuning_cases: int = 4, slices_per_case: int = 24,
                  target: float = TARGET_DICE, equalise_alpha: float = EQUALISE_ALPHA,
                  log: Callable[[str], None] = lambda _: None) -> dict:
    """Write the INT8 graph of `fp32_path` to `out_path` (see the module's rules); returns its record.

    ``equalise_alpha`` 0 leaves the inputs as they are: a network trained quantisation-aware (train/qat.py) learnt
    the 8-bit grid of its unequalised convolution inputs, which equalisation would move it off.

    ``search`` False (an untrained checkpoint, whose masks are noise: nothing to keep) quantises every
    candidate with the first calibration of :data:`CALIBRATIONS` and no tuning phantoms.
    """
    import onnx

    from qnkit.benchmarks.peak import network_flops

    started = time.perf_counter()
    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    candidates, kept_float = candidate_convolutions(model)
    modules = {node.name: _module_name(node) for node in model.graph.node if node.op_type == "Conv"}
    calibration = model_grid_slices(grid, seed=CALIBRATION_SEED, cases=calibration_cases, per_case=slices_per_case,
                                    log=log)
    probe_hw = calibration[0].shape[2:]
    counted = network_flops(str(fp32_path), probe_hw, channels=int(calibration[0].shape[1]))
    flops = counted["per_node"]
    with tempfile.TemporaryDirectory(prefix="qnkit-int8-") as tmp:
        workdir = Path(tmp)
        equalised, done = equalise_inputs(model, set(candidates), _batched(calibration, 8), alpha=equalise_alpha,
                                          input_name=input_name)
        source = workdir / "equalised.onnx"
        onnx.save(equalised, str(source))
        quantiser = Quantiser(source, workdir, calibration, input_name)
        record = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
                  "activations": "uint8 asymmetric, asymmetric calibrated ranges",
                  "weights": "int8 symmetric per channel",
                  "calibration_data": {"generator": "qnkit.synth anatomy", "seed": CALIBRATION_SEED,
                                       "cases": calibration_cases,
                                       "slices": int(sum(len(c) for c in calibration)),
                                       "grid": "the model's (qnkit.inference.to_model_input)"},
                  "equalised_inputs": {"alpha": equalise_alpha, "convolutions": len(done)}}
        if not search:
            chosen = CALIBRATIONS[0]
            quantised = list(candidates)
            quantiser.quantise(Path(out_path), quantised, chosen)
            record.update(calibration=chosen[0], search=None)
        else:
            tuning = model_grid_slices(grid, seed=TUNING_SEED, cases=tuning_cases, per_case=slices_per_case, log=log)
            agreement = Agreement(Path(fp32_path), tuning, threshold, input_name)
            equalised_dice, _ = agreement.dice(source)
            scores = {}
            for option in CALIBRATIONS:
                scores[option[0]], _ = agreement.dice(quantiser.quantise(workdir / "calibration.onnx", candidates,
                                                                         option))
                log(f"INT8 calibration {option[0]}: every candidate in INT8: mask Dice {scores[option[0]]:.4f}")
            chosen = next(option for option in CALIBRATIONS if option[0] == max(scores, key=scores.get))
            found = sensitivity_search(quantiser, agreement, candidates, flops, chosen, target=target, log=log)
            quantised = found["quantised"]
            alone = {row["node"]: row["dice_alone"] for row in found["table"]}
            for row in found["table"]:
                row["module"] = modules.get(row["node"], row["node"])
            for name in candidates:
                if name not in quantised:
                    kept_float[name] = (f"sensitive: mask Dice {alone[name]:.4f} quantised alone; with it the INT8 set "
                                        f"fell below {target} on the tuning phantoms (or {CASE_FLOOR} on one)")
            quantiser.quantise(Path(out_path), quantised, chosen)
            share = _share(quantised, flops)
            record.update(calibration=chosen[0], calibrations_tried={k: round(v, 5) for k, v in scores.items()},
                          search={"tuning_data": {"generator": "qnkit.synth anatomy", "seed": TUNING_SEED,
                                                  "cases": tuning_cases,
                                                  "slices": int(sum(len(c) for c in tuning))},
                                  "target_dice": target, "case_floor": CASE_FLOOR,
                                  "equalised_fp32_dice": round(equalised_dice, 5),
                                  "sensitivity": found["table"], "steps": found["steps"],
                                  "dice": round(found["dice"], 5), "worst_case_dice": round(found["worst_case_dice"], 5),
                                  "note": None if share >= MIN_INT8_SHARE else
                                  f"post-training quantisation keeps only {share:.0%} of the FLOPs in INT8 at mask "
                                  f"Dice {target} on the tuning phantoms; quantisation-aware fine-tuning is the next "
                                  f"step"})
    record.update(quantised_convolutions=len(quantised), int8_flops_share=round(_share(quantised, flops), 4),
                  quantised=[{"node": n, "module": modules.get(n, n)} for n in quantised],
                  kept_float=[{"node": n, "module": modules.get(n, n), "why": why} for n, why in sorted(kept_float.items())],
                  float_convolutions=sorted(kept_float), seconds=round(time.perf_counter() - started, 2))
    return record


def quantised_convolutions(int8_path: Path) -> list[str]:
    """Names of the Conv nodes of a QDQ graph whose weight is dequantised from INT8 (those that run in INT8)."""
    import onnx

    graph = onnx.load(str(int8_path)).graph
    dequantised = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return [node.name for node in graph.node if node.op_type == "Conv" and node.input[1] in dequantised]

