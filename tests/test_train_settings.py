"""Settings: defaults, .ini parsing, presets, overrides and clear errors."""
import pytest

from qnkit.errors import QnkitInputError
from qnkit.train.settings import PRESETS, Settings, load_settings, read_ini


def test_defaults_are_the_reports():
    s = Settings()
    assert (s.data.hu_lo, s.data.hu_hi, s.data.slice_margin, s.data.omega0) == (-200, 400, 20, 2.0)
    assert (s.data.test_fraction, s.data.val_fraction) == (0.2, 0.2)
    t = s.training
    assert (t.effective_batch, t.lr, t.beta1, t.beta2, t.eps) == (16, 1e-3, 0.9, 0.999, 1e-8)
    assert (t.step_size, t.gamma, t.alpha, t.beta, t.early_stop_patience) == (50, 0.5, 1.0, 0.5, 2)
    assert s.network.num_filters == 64 and s.network.se_block == "CSSE" and s.network.drop_out == 0.2
    assert s.eval.threshold == 0.5


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse(name):
    s = load_settings(name)
    # shipped: the CPU-trained model; shipped-gpu: the wider one a GPU machine trains; shipped-fast: on windows;
    # shipped-context: shipped-fast with five planes per slice, 3 mm apart (2.5-D)
    assert s.network.num_filters == {"shipped": 16, "shipped-gpu": 32, "shipped-fast": 16,
                                     "shipped-context": 16}.get(name, 64)
    assert s.training.crop_size == (128 if name in ("shipped-fast", "shipped-context") else 0)
    assert (s.network.num_channels, float(s.data.context_mm)) == ((5, 3.0) if name == "shipped-context" else (1, 0.0))
    if name.startswith("shipped"):
        assert s.training.augment and s.training.slices_per_epoch > 0 and float(s.data.pixel_spacing_mm) == 2.5
    if name == "shipped-gpu":
        assert s.common.device == "auto" and s.training.schedule == "poly" and s.common.num_workers > 1
    if name == "cluster":
        assert s.common.device == "cuda" and s.common.dist_backend == "nccl"


def test_ini_and_overrides(tmp_path):
    ini = tmp_path / "s.ini"
    ini.write_text("[TRAINING]\nepochs = 7\namp = yes\n[DATA]\nmax_tumor_kidney_ratio =\nhu_lo = -100\n")
    s = load_settings(ini, {("TRAINING", "epochs"): 3, ("NETWORK", "num_filters"): 8, ("COMMON", "seed"): None})
    assert s.training.epochs == 3 and s.training.amp is True and s.network.num_filters == 8
    assert s.data.max_tumor_kidney_ratio is None and s.data.hu_lo == -100.0
    again = Settings.from_dict(s.to_dict())
    assert again == s
    (tmp_path / "round.ini").write_text(s.to_ini())
    assert read_ini(tmp_path / "round.ini") == s


@pytest.mark.parametrize("text, words", [
    ("[TRAINNG]\nepochs = 3\n", ["TRAINNG", "unknown section"]),
    ("[TRAINING]\nepoch = 3\n", ["[TRAINING]", "epoch", "unknown key"]),
    ("[TRAINING]\nepochs = three\n", ["[TRAINING]", "epochs", "integer"]),
    ("[TRAINING]\nepochs = 0\n", ["[TRAINING]", "epochs", ">= 1"]),
    ("[DATA]\nhu_hi = -500\n", ["[DATA]", "hu_hi"]),
    ("[TRAINING]\namp = maybe\n", ["amp", "boolean"]),
    ("[TRAINING]\nlr = nan\n", ["lr", "finite"]),
    ("no section header\n", ["not a valid .ini"]),
    ("[NETWORK]\nnum_channels = 3\n", ["num_channels = 3", "context_mm = 0", "disagree"]),
    ("[DATA]\ncontext_mm = 3\n", ["num_channels = 1", "context_mm = 3", "disagree"]),
    ("[NETWORK]\nnum_channels = 2\n[DATA]\ncontext_mm = 3\n", ["[NETWORK]", "num_channels", "odd"]),
    ("[DATA]\ncontext_mm = -1\n", ["[DATA]", "context_mm", ">= 0"]),
])
def test_bad_settings_name_file_section_key(tmp_path, text, words):
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    with pytest.raises(QnkitInputError) as err:
        load_settings(ini)
    message = str(err.value)
    assert str(ini) in message
    for word in words:
        assert word in message
    assert "\n" not in message


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(QnkitInputError, match="not found"):
        load_settings(tmp_path / "nope.ini")
    with pytest.raises(QnkitInputError, match="device"):
        load_settings(None, {("COMMON", "device"): "tpu"})


def test_pixel_spacing_is_auto_or_a_positive_number():
    assert Settings().data.pixel_spacing_mm == "auto"
    for preset in ("local", "cluster"):
        assert load_settings(preset).data.pixel_spacing_mm == "auto"
    assert load_settings(None, {("DATA", "pixel_spacing_mm"): "1.6"}).data.pixel_spacing_mm == "1.6"
    for bad in ("-3", "0", "abc", "inf"):
        with pytest.raises(QnkitInputError, match="pixel_spacing_mm"):
            load_settings(None, {("DATA", "pixel_spacing_mm"): bad})


def test_crop_size_must_suit_the_network():
    from qnkit.errors import QnkitInputError
    from qnkit.train.runner import network_config

    s = load_settings("shipped-fast")
    s.set("TRAINING", "crop_size", 120, "test")
    with pytest.raises(QnkitInputError, match=r"crop_size = 120 must be a multiple of 16"):
        network_config(s)
    with pytest.raises(QnkitInputError, match="crop_size"):
        load_settings("shipped-fast", {("TRAINING", "crop_size"): -16})


def test_a_three_plane_model_is_num_channels_and_context_mm(tmp_path):
    ini = tmp_path / "ctx.ini"
    ini.write_text("[NETWORK]\nnum_channels = 3\n[DATA]\ncontext_mm = 3.0\n")
    settings = load_settings(ini)
    assert (settings.network.num_channels, settings.data.context_mm) == (3, 3.0)
    assert Settings().data.context_mm == 0.0  # 2-D unless asked
