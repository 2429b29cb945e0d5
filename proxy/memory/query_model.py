"""A fast copy of a local sentence-transformers model for chat queries.

Every chat request waits for its query's embedding, so that one text is on the request
path; the stored memories are embedded in the background, where throughput matters and
latency does not. On this project's machine torch takes ~17 ms for a short question
with all-MiniLM-L6-v2 (most of it per-op overhead), where ONNX Runtime runs the same
network in ~6 ms in float32 and in ~3.6 ms with this copy's 8-bit matrix products:
bench/embed_latency.py.

`build_query_model` turns the loaded model into that file once and keeps it in a cache
directory under a key of the model's files and the tool versions: export with torch;
fuse layer norms and GELU with onnxruntime's transformer optimizer where the
architecture is BERT's; split each fused attention back into its input projection and
the attention proper (`_unfuse_attention`); make every matrix product 8-bit but for
its few outlier input channels (`_quantize_products`). `OnnxEncoder` runs it (and the
`onnx` backend's int8 file). The embedder checks its vectors against the torch model's
own before using it (cosine >= `MIN_COSINE`), so the queries land in the space of the
stored vectors; anything unexpected leaves queries on torch. How close they land on
real chat text, and what that does to the nearest memories: bench/query_agreement.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from proxy.memory.embed import normalize_rows

log = logging.getLogger("mnemoproxy.embed")

# Bump when the build steps change, so that files built the old way are not reused.
RECIPE = 5
# Input channels of each matrix product kept in float32 (see `_quantize_products`).
OUTLIER_CHANNELS = 8
# A copy built by other versions of the model or tools is removed once unused this long.
UNUSED_DAYS = 30
# A build's work directory untouched this long belongs to a killed build.
ABANDONED_AFTER_S = 3600
# Below this cosine to the torch model's vectors the copy is not used: it is built
# wrong. A sound copy is at ~0.998 for "ok" and ~0.9995 for a chat message.
MIN_COSINE = 0.995
PROBES = (
    "Do you remember the lighthouse we found last winter?",
    "*Mira looks up from the map and smiles.* Well met, traveler. The river road is "
    "flooded again, so we will have to go through the old forest instead.",
    "ok",
)
# Texts whose activations pick each product's outlier channels. A transformer's are the
# same few whatever the text (they carry its attention sinks); varied texts find them.
CALIBRATION = (
    *PROBES,
    "What did we decide about the cabin in the mountains?",
    "I told you my sister's name is Anna, remember?",
    "*She laughs and shakes her head.* You never listen, do you?",
    "Can you recommend a good book about the history of Rome?",
    "The meeting moved to Thursday at 3 pm; bring the budget and the new contract.",
    "Ich habe gestern meine Großmutter besucht.",
    "yes",
    "lol that's hilarious",
)


class QueryModelError(Exception):
    """The model cannot be turned into a fast query model; the message says why."""


def build_query_model(st_model: Any, model_dir: Path, cache_dir: Path, name: str) -> Path:
    """The cached 8-bit ONNX file of a loaded sentence-transformers model, built if needed.

    Raises QueryModelError for a model this cannot copy faithfully: anything but a
    transformer followed by mean pooling (and optionally normalisation), or a failed
    export.
    """
    import onnx

    transformer = _check_pipeline(st_model)
    _remove_abandoned_builds(cache_dir)
    target = cache_dir / f"{name}-{_key(model_dir)}.onnx"
    if target.is_file():
        os.utime(target)  # in use: see the clean-up below
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".building-") as tmp:
        plain = Path(tmp) / "model.onnx"
        _export(transformer, plain)
        model = _optimize(plain, transformer.auto_model.config).model
        _unfuse_attention(model)
        _quantize_products(model, _input_ranges(model, transformer.tokenizer))
        _fold_biases(model)
        partial = Path(tmp) / "quantized.onnx"
        onnx.save_model(model, str(partial))
        os.replace(partial, target)  # atomic: a reader never sees half a file
    log.info("built the fast query model %s", target)
    # Copies of this model built by other versions (~60 MB each) that no install has
    # used for a while: another install sharing the cache keeps its own copy fresh. The
    # exact pattern spares another model whose name merely starts with this one's.
    own = re.compile(re.escape(name) + r"-[0-9a-f]{16}\.onnx")
    unused_since = time.time() - UNUSED_DAYS * 86_400
    for stale in cache_dir.glob(f"{name}-*.onnx"):
        if stale != target and own.fullmatch(stale.name):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                if stale.stat().st_mtime < unused_since:
                    stale.unlink()
    return target


def _remove_abandoned_builds(cache_dir: Path) -> None:
    """Remove the work directories of killed builds (~100 MB each). A build lasts
    seconds to a minute, so one untouched for ABANDONED_AFTER_S is nobody's."""
    abandoned_since = time.time() - ABANDONED_AFTER_S
    for work in cache_dir.glob(".building-*"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if work.is_dir() and work.stat().st_mtime < abandoned_since:
                shutil.rmtree(work)


def _check_pipeline(st_model: Any) -> Any:
    """The model's transformer module, if the rest is mean pooling (+ normalise)."""
    modules = list(st_model)
    names = [type(m).__name__ for m in modules]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise QueryModelError(f"unsupported sentence-transformers pipeline {names}")
    if getattr(modules[1], "pooling_mode", None) not in (None, "mean") or not getattr(
        modules[1], "pooling_mode_mean_tokens", True
    ):
        raise QueryModelError("only mean pooling is supported")
    return modules[0]


def _key(model_dir: Path) -> str:
    """What the file depends on: the model's files and the tools' versions."""
    import onnxruntime
    import torch

    files = sorted(
        (str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in model_dir.rglob("*")
        if p.is_file()
    )
    material = [RECIPE, OUTLIER_CHANNELS, str(model_dir.resolve()), files]
    material += [torch.__version__, onnxruntime.__version__]
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()[:16]


def _export(transformer: Any, path: Path) -> None:
    import torch

    model = transformer.auto_model.eval()
    names = list(getattr(transformer.tokenizer, "model_input_names", ["input_ids"]))
    names = [n for n in names if n in ("input_ids", "attention_mask", "token_type_ids")]

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    ids = torch.tensor([[101, 2079, 2017, 3342, 102]])
    sample = tuple(torch.zeros_like(ids) if n == "token_type_ids" else ids for n in names)
    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]}
    # The eager attention exports as plain ops that the optimizer fuses into one
    # Attention node (SDPA's export is not fused, and quantizes less faithfully).
    previous = getattr(model.config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is not None and previous not in (None, "eager"):
            setter("eager")
        with _quiet(), torch.inference_mode():
            torch.onnx.export(
                LastHidden(),
                sample,
                str(path),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
    except Exception as exc:  # any exporter failure: queries stay on torch
        raise QueryModelError(f"could not export the model to ONNX: {exc!r}") from exc
    finally:
        if setter is not None and previous not in (None, "eager"):
            setter(previous)


def _optimize(path: Path, config: Any) -> Any:
    """The exported graph with attention, embeddings and GELU fused (BERT-like models),
    as an onnxruntime OnnxModel."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model

    if getattr(config, "model_type", None) != "bert":
        return OnnxModel(onnx.load(str(path)))
    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False  # see `OnnxEncoder`
    with _quiet():
        return optimize_model(
            str(path),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=1,
            optimization_options=options,
        )


def _unfuse_attention(model: Any) -> None:
    """Each fused self-attention node (`Attention`, float32 weights only) as its input
    projection, a plain MatMul that `_quantize_products` can make 8-bit, and ONNX
    Runtime's `MultiHeadAttention` on the projected queries, keys and values."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Attention"
            or node.domain != "com.microsoft"
            or set(attrs) != {"num_heads"}  # past state, causal masks...: left fused
            or len(node.input) not in (3, 4)
            or node.input[1] not in weights
            or node.input[2] not in weights
        ):
            nodes.append(node)
            continue
        hidden = numpy_helper.to_array(weights[node.input[1]]).shape[1] // 3
        name = node.name or node.output[0]
        qkv, parts = f"{name}/qkv", [f"{name}/{p}" for p in ("q", "k", "v")]
        sizes = numpy_helper.from_array(np.array([hidden] * 3, dtype=np.int64), f"{name}/sizes")
        graph.initializer.append(sizes)
        mask = node.input[3] if len(node.input) == 4 else ""
        nodes += [
            helper.make_node("MatMul", [node.input[0], node.input[1]], [f"{qkv}/raw"]),
            helper.make_node("Add", [f"{qkv}/raw", node.input[2]], [qkv]),
            helper.make_node("Split", [qkv, sizes.name], parts, axis=-1),
            helper.make_node(
                "MultiHeadAttention",
                [*parts, "", mask],  # no bias: added above; the mask pads keys alike
                list(node.output),
                name=name,
                domain="com.microsoft",
                num_heads=attrs["num_heads"],
            ),
        ]
    del graph.node[:]
    graph.node.extend(nodes)


def _products(model: Any) -> list[tuple[int, Any, np.ndarray]]:
    """The MatMul nodes whose second input is a constant 2-D float32 matrix: their
    positions in the graph, the nodes and the matrices."""
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    found = []
    for position, node in enumerate(model.graph.node):
        if node.op_type == "MatMul" and node.domain == "" and node.input[1] in weights:
            matrix = numpy_helper.to_array(weights[node.input[1]])
            if matrix.ndim == 2 and matrix.dtype == np.float32:
                found.append((position, node, matrix))
    return found


def _input_ranges(model: Any, tokenizer: Any) -> dict[str, np.ndarray]:
    """Per matrix product's input: the largest magnitude of each channel over the
    CALIBRATION texts, from the float32 graph."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(dict.fromkeys(node.input[0] for _, node, _ in _products(model)))
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    ranges: dict[str, np.ndarray] = {}
    for text in CALIBRATION:
        encoded = tokenizer(text, return_tensors="np")
        feeds = {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in wanted}
        for name, value in zip(names, session.run(names, feeds), strict=True):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            ranges[name] = np.maximum(ranges.get(name, peak), peak)
    return ranges


def _quantize_products(model: Any, ranges: dict[str, np.ndarray]) -> None:
    """Every matrix product with constant weights as an 8-bit one, except the
    OUTLIER_CHANNELS input channels of largest range, kept in float32.

    `DynamicQuantizeMatMul` quantizes its input to 8 bits per call with one scale for
    the whole tensor, and runs ONNX Runtime's fast integer kernels (3-4x the float
    speed here; MatMulNBits, which scales each block of 32 values, ran at float speed).
    One scale is faithful only without a transformer's few outlier channels, whose
    values run 10-30x the others': those are multiplied in float32 on their own and
    added back (LLM.int8()'s decomposition). Weights are 8-bit per output column.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    replaced: dict[int, list[Any]] = {}
    for position, node, matrix in _products(model):
        x, y = node.input[0], node.output[0]
        name = node.name or y
        # Attention's output, a weighted mean of values, has no outlier channels: the
        # decomposition would only cost its four nodes (its vectors did not change).
        averaged = made_by.get(x) in ("MultiHeadAttention", "Attention")
        count = 0 if averaged else OUTLIER_CHANNELS
        outliers = np.sort(np.argsort(-ranges[x], kind="stable")[:count])
        keep = np.ones(matrix.shape[0], dtype=np.float32)
        keep[outliers] = 0.0
        kept = matrix * keep[:, None]
        scale = np.maximum(np.abs(kept).max(axis=0), 1e-12) / 127.0
        quantized = np.clip(np.round(kept / scale), -127, 127).astype(np.int8)
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{name}/q8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{name}/scale"),
            ]
        )
        product = helper.make_node(
            "DynamicQuantizeMatMul",
            [x, f"{name}/q8", f"{name}/scale"],
            [y],
            name=f"{name}/q8",
            domain="com.microsoft",
        )
        if not count:
            replaced[position] = [product]
            continue
        graph.initializer.extend(
            numpy_helper.from_array(value, f"{name}/{suffix}")
            for suffix, value in (
                ("keep", keep),
                ("channels", outliers.astype(np.int64)),
                ("outlier_weights", matrix[outliers]),
            )
        )
        product.input[0], product.output[0] = f"{name}/kept", f"{name}/main"
        replaced[position] = [
            helper.make_node("Mul", [x, f"{name}/keep"], [f"{name}/kept"]),
            product,
            helper.make_node("Gather", [x, f"{name}/channels"], [f"{name}/outliers"], axis=-1),
            helper.make_node(
                "MatMul", [f"{name}/outliers", f"{name}/outlier_weights"], [f"{name}/rest"]
            ),
            helper.make_node("Add", [f"{name}/main", f"{name}/rest"], [y]),
        ]
    nodes = [new for i, node in enumerate(graph.node) for new in replaced.get(i, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _fold_biases(model: Any) -> None:
    """Each bias added after an 8-bit product given to the product itself (its optional
    `bias` input), where nothing else reads the sum without it.

    A short query runs ~160 small nodes, each with a fixed cost: leaving out MiniLM's 18
    bias additions took a query from 3.15 to 3.05 ms (p50 of 1000 alternating runs).
    """
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    removed: set[int] = set()
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        bias = next((i for i in node.input if i in constants), None)
        total = next((i for i in node.input if i != bias), None)
        if bias is None or total is None or len(constants[bias].dims) != 1:
            continue
        summed = made_by.get(total)
        product = summed
        if summed is not None and summed.op_type == "Add":  # main + the outliers' part
            product = next((made_by.get(i) for i in summed.input if _is_q8(made_by.get(i))), None)
        if (
            summed is None
            or not _is_q8(product)
            or len(product.input) > 3
            or readers.get(total) != 1
            or total in outputs
            or readers.get(product.output[0]) != 1
        ):
            continue
        product.input.extend(["", bias])  # no zero point: the weights are symmetric
        summed.output[0] = node.output[0]
        removed.add(id(node))
    nodes = [node for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)


def _is_q8(node: Any) -> bool:
    return node is not None and node.op_type == "DynamicQuantizeMatMul"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter, optimizer and quantizer log every node at INFO; keep warnings."""
    names = ("onnxruntime", "onnxruntime.quantization", "onnxruntime.transformers", "root")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class OnnxEncoder:
    """An ONNX text encoder: tokenize, run, mean-pool over the mask, L2-normalise.

    `per_text`: run each text on its own, never padded into a batch, as the fast query
    copy needs (its 8-bit products scale each run's whole input, padding included).
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        max_seq_length: int,
        threads: int,
        per_text: bool = False,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if not tokenizer_path.is_file():
            raise QueryModelError(f"no tokenizer file {tokenizer_path}")
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # A tokenizer.json may ship with its own fixed truncation (128 for MiniLM's);
        # the model takes `max_seq_length` (256), as sentence-transformers does.
        tokenizer.enable_truncation(max_length=max_seq_length)
        pad_id = tokenizer.token_to_id("[PAD]") or 0
        tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle worker threads must not spin on a CPU shared with the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                options,
                providers=["CPUExecutionProvider"],
                # Residual + layer norm as two plain nodes: the fused kernel took ~30 us
                # where they take ~10 (a tenth of a short query's time, 12 times).
                disabled_optimizers=["SkipLayerNormFusion"],
            )
        except Exception as exc:
            raise QueryModelError(f"could not load ONNX model {model_path}: {exc}") from exc
        self.tokenizer = tokenizer
        self.inputs = frozenset(i.name for i in self.session.get_inputs())
        self.per_text = per_text

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit float32 rows, one per text."""
        if self.per_text and len(texts) > 1:
            return np.concatenate([self.encode([text]) for text in texts])
        # A chat query is one text: `encode` tokenizes it on this thread, where
        # `encode_batch` hands it to the tokenizer's thread pool; in the server that
        # hand-off cost ~0.9 ms of every request's wait for its embedding.
        encodings = (
            [self.tokenizer.encode(texts[0])]
            if len(texts) == 1
            else self.tokenizer.encode_batch(texts)
        )
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}
        hidden = self.session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return normalize_rows(pooled)
