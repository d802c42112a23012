"""QuickNAT network: shapes, options, config, native vs mask unpooling, ONNX export."""
import json
import warnings

import numpy as np
import pytest

import torch

from qnkit.nn.quicknat import (  # noqa: E402
    SE_BLOCKS, ChannelSELayer, ChannelSpatialSELayer, QuickNAT, QuickNATConfig, SpatialSELayer,
    WithSigmoid,
)

SMALL = dict(num_filters=6)
DEFAULT_PARAMS = 3_549_272


def small(unpool="indices", **kw):
    torch.manual_seed(0)
    return QuickNAT(QuickNATConfig(**{**SMALL, **kw}), unpool=unpool)


def test_default_model_parameter_count_and_forward():
    model = QuickNAT().eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"QuickNAT default parameters: {n:,}")
    assert n == DEFAULT_PARAMS
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("hw", [(32, 32), (48, 80), (64, 16)])
def test_output_shape(hw):
    model = small().eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, *hw))
    assert y.shape == (2, 1, *hw) and y.dtype == torch.float32


def test_multichannel_multiclass_shape():
    model = small(num_channels=3, num_class=2, kernel_h=3, kernel_w=7, se_block="SSE").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 2, 32, 48)


@pytest.mark.parametrize("shape", [(1, 1, 40, 32), (1, 1, 32, 24), (1, 2, 32, 32), (1, 32, 32)])
def test_bad_input_shape_raises(shape):
    with pytest.raises(ValueError, match="divisible by 16"):
        small()(torch.randn(shape))


def test_dropout_train_vs_eval():
    model = small(drop_out=0.5)
    x = torch.randn(2, 1, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in small(drop_out=0.0).modules())


@pytest.mark.parametrize("se", SE_BLOCKS)
def test_se_block_variants(se):
    model = small(se_block=se).eval()
    kinds = {type(m) for m in model.modules()}
    expected = {"NONE": set(), "CSE": {ChannelSELayer}, "SSE": {SpatialSELayer},
                "CSSE": {ChannelSpatialSELayer, ChannelSELayer, SpatialSELayer}}[se]
    assert kinds & {ChannelSELayer, SpatialSELayer, ChannelSpatialSELayer} == expected
    assert type(model.bottleneck.se) is torch.nn.Identity  # reference applies no SE there
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_csse_is_max_of_channel_and_spatial_se():
    torch.manual_seed(0)
    layer, x = ChannelSpatialSELayer(8), torch.randn(2, 8, 5, 5)
    assert torch.equal(layer(x), torch.maximum(layer.cSE(x), layer.sSE(x)))


def test_config_round_trip_and_validation():
    cfg = QuickNATConfig(num_filters=8, se_block="csse", drop_out=0)
    assert cfg.se_block == "CSSE" and cfg.drop_out == 0.0 and cfg.size_divisor == 16
    d = json.loads(json.dumps(cfg.to_dict()))
    assert QuickNATConfig.from_dict(d) == cfg
    assert QuickNATConfig.from_dict({}) == QuickNATConfig()
    assert QuickNAT(d).config == cfg
    with pytest.raises(ValueError, match="unknown"):
        QuickNATConfig.from_dict({**d, "num_classes": 2})
    for bad in [dict(se_block="XSE"), dict(drop_out=1.0), dict(kernel_h=4), dict(num_filters=True),
                dict(num_filters=0), dict(pool=2, stride_pool=1), dict(stride_conv=2),
                dict(num_filters=1), dict(num_class=1.0)]:
        with pytest.raises(ValueError):
            QuickNATConfig(**bad)
    with pytest.raises(ValueError):
        small().set_unpool("scatter")


def test_probabilities():
    model = small().eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        p, logits = model.predict_proba(x), model(x)
        assert torch.equal(p, torch.sigmoid(logits)) and torch.equal(WithSigmoid(model)(x), p)
    assert ((p > 0) & (p < 1)).all()


def _windows_with_ties(model, x):
    """Count 2x2 windows of the encoder outputs (pool inputs) whose maximum is tied."""
    outs = []
    hooks = [e.register_forward_hook(lambda m, i, o: outs.append(o)) for e in model.encoders]
    model(x)
    for h in hooks:
        h.remove()
    ties = 0
    for o in outs:
        w = o.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
        ties += int(((w == w.amax(-1, keepdim=True)).sum(-1) > 1).sum())
    return ties


def _tie_heavy_inputs():
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 3, (2, 1, 4, 4), generator=g).float()
    yield "random", torch.randn(2, 1, 32, 48, generator=g)
    yield "constant", torch.full((2, 1, 32, 32), 0.7)
    yield "piecewise-constant", blocks.repeat_interleave(16, 2).repeat_interleave(16, 3)
    yield "int-small-range", torch.randint(0, 2, (2, 1, 32, 32), generator=g).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mask_unpool_model_equals_native(dtype):
    model = small(se_block="CSSE").to(dtype).eval()
    total_ties = 0
    with torch.no_grad():
        for name, x in _tie_heavy_inputs():
            x = x.to(dtype)
            ref = model.set_unpool("indices")(x)
            total_ties += _windows_with_ties(model, x)
            assert torch.equal(model.set_unpool("mask")(x), ref), name
    assert total_ties > 100  # the comparison really exercises tied maxima


def test_mask_unpool_model_equals_native_in_train_mode():
    """Dropout2d zeroes whole channels -> all-tie windows; same RNG stream in both forms."""
    model = small(drop_out=0.5).train()
    x = torch.randn(2, 1, 32, 32)
    outs = []
    for mode in ("indices", "mask"):
        torch.manual_seed(7)
        outs.append(model.set_unpool(mode)(x))
    assert torch.equal(*outs)


# --- ONNX export (mask form) ------------------------------------------------------------------

FORBIDDEN = {"ScatterND", "ScatterElements", "Scatter", "MaxUnpool", "ArgMax"}


# qnkit's own exporter (torch.onnx dynamo, opset 18, dynamic batch/height/width) is tested on the shared
# bundle's graphs (tests/test_export.py: ops, types, verification against eager). This checks, in a fast
# second tracing, that the network stays exportable by the legacy TorchScript exporter at opset 17 too.
LEGACY_OPSET = 17


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``WithSigmoid(model)`` in mask form, exported with a dynamic batch axis (``dynamo=False``)."""
    import onnx
    model = small(se_block="CSSE").eval()
    path = tmp_path_factory.mktemp("onnx") / "quicknat_torchscript.onnx"
    wrapped = WithSigmoid(model.set_unpool("mask")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        torch.onnx.export(wrapped, (torch.randn(2, 1, 32, 48),), str(path), dynamo=False,
                          opset_version=LEGACY_OPSET, input_names=["image"], output_names=["probability"],
                          dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}})
    return model, path, onnx.load(str(path)), LEGACY_OPSET


def test_onnx_graph_is_plain(exported):
    import onnx

    _, path, proto, opset = exported
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    print("ONNX ops:", sorted(ops))
    assert not ops & FORBIDDEN
    assert "MaxPool" not in ops  # pooling is an element-wise Max of strided slices
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 48]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_eager(exported, batch):
    import onnxruntime as ort
    model, path, _, _ = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 1, 32, 48)
    with torch.no_grad():
        ref = model.set_unpool("indices").predict_proba(x).numpy()
    (out,) = sess.run(None, {"image": x.numpy()})
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def _trained_looking(model):
    with torch.no_grad():  # batch norms away from identity, so that copying their vectors matters
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            for t, lo, hi in ((bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0), (bn.weight, 0.5, 1.5),
                              (bn.bias, -0.2, 0.2)):
                t.uniform_(lo, hi)
    return model


@pytest.mark.parametrize("se_block", ["CSSE", "CSE", "SSE", "NONE"])
@pytest.mark.parametrize("filters, wider, channels", [(4, 8, 1), (4, 7, 3), (6, 6, 1)])
def test_widened_network_computes_what_the_narrow_network_computes(se_block, filters, wider, channels):
    """Net2WiderNet: F filters widened to more give the same output (unequal shares of each copied channel's
    weights sum to the old weight), every tensor has the wider network's shape, and the copies differ
    (their shares do), so that training can pull them apart."""
    from qnkit.nn.quicknat import widen_filters

    narrow = _trained_looking(small(num_filters=filters, num_channels=channels, se_block=se_block)).eval()
    state = widen_filters(narrow.state_dict(), narrow.config, wider, noise=0.05)
    wide = QuickNAT(QuickNATConfig(**{**SMALL, "num_filters": wider, "num_channels": channels,
                                      "se_block": se_block})).eval()
    wide.load_state_dict(state)  # strict: every key, every shape
    x = torch.rand(2, channels, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), narrow(x), rtol=0, atol=2e-5)
    if wider > filters:
        w = state["decoders.0.conv1.weight"]
        assert not torch.equal(w[:, 0], w[:, filters])  # channel 0 and its copy are read with different shares
    exact = widen_filters(narrow.state_dict(), narrow.config, wider, noise=0.0)
    copies = len(range(0, wider, filters))  # of channel 0: 2 or 1 here, so the share is exact in float
    assert torch.equal(exact["classifier.weight"][:, 0] * copies, narrow.state_dict()["classifier.weight"][:, 0])
    with pytest.raises(ValueError, match="more"):
        widen_filters(narrow.state_dict(), narrow.config, filters - 1)


@pytest.mark.parametrize("channels", [3, 5])
def test_inflated_network_computes_what_the_2d_network_computes(channels):
    """A 2-D network's weights inflated to C input planes (the centre plane the slice) give the 2-D network's
    output whatever the other planes hold; only the first block's input-sized tensors changed."""
    from qnkit.nn.quicknat import INPUT_PLANE_TENSORS, inflate_input_planes

    flat = small(num_filters=4).eval()
    with torch.no_grad():  # trained-looking batch norms, so that copying the centre's statistics matters
        for bn in (m for m in flat.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            for t, lo, hi in ((bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0), (bn.weight, 0.5, 1.5),
                              (bn.bias, -0.2, 0.2)):
                t.uniform_(lo, hi)
    state = inflate_input_planes(flat.state_dict(), channels)
    deep = QuickNAT(QuickNATConfig(num_filters=4, num_channels=channels)).eval()
    deep.load_state_dict(state)
    changed = {k for k, v in state.items() if v.shape != flat.state_dict()[k].shape}
    assert changed == set(INPUT_PLANE_TENSORS)
    x = torch.rand(2, channels, 32, 48)
    with torch.no_grad():
        assert torch.allclose(deep(x), flat(x[:, channels // 2:channels // 2 + 1]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one-plane"):
        inflate_input_planes(state, channels)


def test_a_checkpoint_loads_inflated_and_widened(tmp_path):
    """What `qnkit train --init-from` does with a narrower 2-D run's best checkpoint for a wider 2.5-D network:
    the checkpoint read and verified, its input plane inflated, its filters widened; the same output."""
    from qnkit.train import checkpoint as ckpt

    flat = _trained_looking(small(num_filters=4)).eval()
    folder = ckpt.save(tmp_path / "run", "best", flat, {"network": flat.config.to_dict(), "epoch": 1})
    deep = QuickNAT(QuickNATConfig(**{**SMALL, "num_filters": 8, "num_channels": 3})).eval()
    ckpt.load_weights(folder, deep, inflate=True, widen_from=4)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), flat(x[:, 1:2]), rtol=0, atol=2e-5)
