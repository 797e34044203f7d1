"""Checkpoint formats in and out: the releases, open_clip towers, safe loading, saving, the merge command.

The files under ``tests/fixtures`` were written by ``tests/fixtures/make_release_fixtures.py`` under
open_clip_torch==2.0.2 with the release's ``src/modeling.py``: they are the releases' exact formats
on a tiny architecture, with the outputs open_clip 2.0.2 computed for them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import pickletools  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.transformer import QuickGELU, VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402

from momaestimator.checkpoints import (  # noqa: E402
    TALL_MASKS_TASKS,
    TASK_VECTORS_TASKS,
    CheckpointError,
    CorruptCheckpointError,
    LegacyObject,
    UnsafeCheckpointError,
    atomic_write,
    build_open_clip_encoder,
    canonical_task_name,
    head_from_checkpoint,
    infer_open_clip_config,
    legacy_state_dict,
    load_legacy_pickle,
    load_merged_model,
    load_open_clip_encoder,
    load_state_dict_file,
    load_tall_masks_release,
    load_task_vectors_release,
    read_checkpoint,
    save_merged_model,
)
from momaestimator.checkpoints.cli import _build_parser, main  # noqa: E402
from momaestimator.checkpoints.safe_pickle import loads_restricted, torch_load_restricted  # noqa: E402
from momaestimator.models import LinearHead, MergedModel  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TINY = "tiny-ViT"
TINY_CFG = json.loads((FIXTURES / "tiny-ViT.json").read_text())
TV_ROOT = FIXTURES / "task_vectors"
TALL_ROOT = FIXTURES / "tall_masks"
TV_TASKS = ["SUN397", "Cars", "MNIST"]
TALL_TASKS = ["Cars", "DTD", "MNIST"]


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "release_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def tv_release():
    return load_task_vectors_release(TV_ROOT, TINY, TV_TASKS, model_cfg=TINY_CFG)


def _pickle_globals(path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _copy_release(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / src.name
    shutil.copytree(src, root)
    return root


def _tensor_digest(state) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in state.items()
    }


# ---------------------------------------------------------------- the releases, as open_clip 2.0.2 wrote them


def test_fixtures_hold_the_old_class_names_that_today_s_open_clip_lacks():
    names = _pickle_globals(TV_ROOT / TINY / "zeroshot.pt") | _pickle_globals(TV_ROOT / TINY / "head_Cars.pt")
    assert {"src.modeling.ImageEncoder", "src.modeling.ClassificationHead"} <= names
    assert {"open_clip.model.CLIP", "open_clip.model.VisualTransformer", "open_clip.model.QuickGELU"} <= names
    assert not hasattr(open_clip.model, "VisualTransformer")
    assert "src" not in sys.modules
    assert "src.models.modeling.ClassificationHead" in _pickle_globals(TALL_ROOT / TINY / "head_CarsVal.pt")


def test_fixtures_are_commit_sized():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 1_000_000


def test_task_vectors_release_reproduces_open_clip_2_0_2_outputs(tv_release, reference):
    pretrained, finetuned, heads = tv_release
    x = reference["inputs"]
    assert isinstance(pretrained, VisionTransformer)
    assert isinstance(pretrained.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert list(finetuned) == TV_TASKS and list(heads) == TV_TASKS
    with torch.no_grad():
        torch.testing.assert_close(pretrained(x), reference["features"]["pretrained"])
        for task in TV_TASKS:
            features = finetuned[task](x)
            torch.testing.assert_close(features, reference["features"][task])
            torch.testing.assert_close(heads[task](features), reference["logits"][task], rtol=1e-5, atol=1e-4)
            assert heads[task].normalize


def test_tall_masks_release_reproduces_open_clip_2_0_2_outputs(reference):
    pretrained, finetuned, heads = load_tall_masks_release(TALL_ROOT, TINY, TALL_TASKS, model_cfg=TINY_CFG)
    x = reference["inputs"]
    assert list(finetuned) == TALL_TASKS
    with torch.no_grad():
        torch.testing.assert_close(pretrained(x), reference["features"]["pretrained"])
        for task in TALL_TASKS:
            features = finetuned[task](x)
            torch.testing.assert_close(features, reference["features"][task])
            torch.testing.assert_close(heads[task](features), reference["logits"][task], rtol=1e-5, atol=1e-4)


def test_whole_object_pickle_and_state_dict_of_the_same_encoder_agree():
    legacy = load_legacy_pickle(TV_ROOT / TINY / "zeroshot.pt")
    assert isinstance(legacy, LegacyObject) and type(legacy).legacy_class == "src.modeling.ImageEncoder"
    from_pickle = legacy_state_dict(legacy)
    from_state_dict = load_state_dict_file(TALL_ROOT / TINY / "MNISTVal" / "nonlinear_zeroshot.pt")
    assert from_pickle.keys() == from_state_dict.keys()
    assert all(torch.equal(from_pickle[k], from_state_dict[k]) for k in from_pickle)
    # The release deleted the text transformer but kept these leftovers.
    assert "model.token_embedding.weight" in from_pickle and not any(
        k.startswith("model.transformer.") for k in from_pickle
    )


def test_tasks_match_case_insensitively_with_aliases_and_keep_the_requested_order():
    _, finetuned, heads = load_task_vectors_release(TV_ROOT, TINY, ["mnist", "stanford_cars"], model_cfg=TINY_CFG)
    assert list(finetuned) == ["MNIST", "Cars"] and list(heads) == ["MNIST", "Cars"]
    assert canonical_task_name("SUN397") == canonical_task_name("sun-397") == "SUN397"
    assert canonical_task_name("oxford_pets") == "OxfordIIITPet"
    assert canonical_task_name("EuroSATVal") == "EuroSAT"
    assert canonical_task_name("not-a-task") is None


def test_default_tasks_are_the_release_s_and_missing_files_are_all_listed():
    assert TASK_VECTORS_TASKS == ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
    with pytest.raises(FileNotFoundError) as info:
        load_task_vectors_release(TV_ROOT, TINY, model_cfg=TINY_CFG)
    for task in ("RESISC45", "EuroSAT", "SVHN", "GTSRB", "DTD"):
        assert f"{task}/finetuned.pt" in str(info.value)
    assert "SUN397/" not in str(info.value)


def test_tall_masks_task_lists_are_prefixes_of_the_release_order():
    assert TALL_MASKS_TASKS[:8] == ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397")
    assert len(TALL_MASKS_TASKS) == 20 and TALL_MASKS_TASKS[13] == "FER2013"
    with pytest.raises(FileNotFoundError, match="STL10Val"):
        load_tall_masks_release(TALL_ROOT, TINY, 14, model_cfg=TINY_CFG)
    with pytest.raises(ValueError, match="8, 14, 20"):
        load_tall_masks_release(TALL_ROOT, TINY, 9, model_cfg=TINY_CFG)


def test_tall_masks_zeroshot_is_found_in_any_task_folder(tmp_path, reference):
    root = _copy_release(TALL_ROOT, tmp_path)
    shutil.move(root / TINY / "MNISTVal" / "nonlinear_zeroshot.pt", root / TINY / "DTDVal" / "nonlinear_zeroshot.pt")
    pretrained, _, _ = load_tall_masks_release(root, TINY, ["cars"], model_cfg=TINY_CFG)
    with torch.no_grad():
        torch.testing.assert_close(pretrained(reference["inputs"]), reference["features"]["pretrained"])


def test_unknown_model_folder_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="tiny-ViT"):
        load_task_vectors_release(TV_ROOT, "ViT-B-32")


def test_quick_gelu_can_be_overridden():
    pretrained, _, _ = load_task_vectors_release(TV_ROOT, TINY, ["MNIST"], model_cfg=TINY_CFG, quick_gelu=False)
    assert isinstance(pretrained.transformer.resblocks[0].mlp.gelu, nn.GELU)


def test_a_model_config_naming_its_activation_is_followed(tmp_path, capsys):
    # TALL-masks towers are state dicts: nothing in the files says GELU or QuickGELU
    gelu_cfg = {**TINY_CFG, "quick_gelu": False}
    pretrained, finetuned, _ = load_tall_masks_release(TALL_ROOT, TINY, TALL_TASKS, model_cfg=gelu_cfg)
    for tower in (pretrained, *finetuned.values()):
        assert type(tower.transformer.resblocks[0].mlp.gelu) is nn.GELU
    default, _, _ = load_tall_masks_release(TALL_ROOT, TINY, TALL_TASKS, model_cfg=TINY_CFG)
    assert isinstance(default.transformer.resblocks[0].mlp.gelu, QuickGELU)
    explicit, _, _ = load_tall_masks_release(TALL_ROOT, TINY, TALL_TASKS, model_cfg=gelu_cfg, quick_gelu=True)
    assert isinstance(explicit.transformer.resblocks[0].mlp.gelu, QuickGELU)
    # a pickled tower says what it is: the config does not override it (as load_open_clip_encoder)
    pickled, _, _ = load_task_vectors_release(TV_ROOT, TINY, ["MNIST"], model_cfg=gelu_cfg)
    assert isinstance(pickled.transformer.resblocks[0].mlp.gelu, QuickGELU)
    cfg_file = tmp_path / "gelu.json"
    cfg_file.write_text(json.dumps(gelu_cfg))
    args = _command(tmp_path, release="tall_masks", root=TALL_ROOT, tasks=TALL_TASKS)
    args = _replace(args, "--data", str(_npz(tmp_path / "tall.npz", names=("cars", "dtd", "mnist"))))
    main(_replace(args, "--model-config", str(cfg_file)))
    assert json.loads((tmp_path / "out" / "model.json").read_text())["encoder"]["quick_gelu"] is False


def test_every_missing_file_is_listed_in_one_error_before_anything_loads(tmp_path, monkeypatch):
    from momaestimator.checkpoints import releases

    monkeypatch.setattr(releases, "_load_release", lambda *args: pytest.fail("loading started"))
    tv = _copy_release(TV_ROOT, tmp_path / "tv")
    shutil.rmtree(tv / TINY / "Cars")
    (tv / TINY / "head_MNIST.pt").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_task_vectors_release(tv, TINY, TV_TASKS, model_cfg=TINY_CFG)
    assert "Cars/finetuned.pt" in str(info.value) and "head_MNIST.pt" in str(info.value)
    assert "SUN397" not in str(info.value)

    tall = _copy_release(TALL_ROOT, tmp_path / "tall")
    shutil.rmtree(tall / TINY / "CarsVal")
    (tall / TINY / "head_DTDVal.pt").unlink()
    (tall / TINY / "MNISTVal" / "nonlinear_zeroshot.pt").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_tall_masks_release(tall, TINY, TALL_TASKS, model_cfg=TINY_CFG)
    for name in ("CarsVal/nonlinear_finetuned.pt", "head_DTDVal.pt", "nonlinear_zeroshot.pt"):
        assert name in str(info.value)


def test_paths_starting_with_a_tilde_are_expanded(tmp_path, monkeypatch, reference):
    monkeypatch.setenv("HOME", str(tmp_path))
    _copy_release(TV_ROOT, tmp_path)
    _copy_release(TALL_ROOT, tmp_path)
    pretrained, finetuned, _ = load_task_vectors_release("~/task_vectors", TINY, ["MNIST"], model_cfg=TINY_CFG)
    with torch.no_grad():
        torch.testing.assert_close(finetuned["MNIST"](reference["inputs"]), reference["features"]["MNIST"])
    load_tall_masks_release("~/tall_masks", TINY, ["MNIST"], model_cfg=TINY_CFG)
    state_file = "~/tall_masks/tiny-ViT/MNISTVal/nonlinear_finetuned.pt"
    for loader in (read_checkpoint, load_state_dict_file, load_legacy_pickle):
        assert "model.visual.proj" in loader(state_file)
    load_open_clip_encoder(TINY_CFG, state_file)
    save_merged_model(MergedModel(pretrained, {"a": LinearHead(torch.randn(2, 16))}), "~/merged", architecture=TINY_CFG)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert load_merged_model("~/merged").tasks == ["a"]


def _half_precision_tall_release(tmp_path: Path, zeroshot_dtype, finetuned_dtype) -> Path:
    root = _copy_release(TALL_ROOT, tmp_path)
    for path in (root / TINY).glob("*Val/nonlinear_*.pt"):
        dtype = zeroshot_dtype if path.name == "nonlinear_zeroshot.pt" else finetuned_dtype
        state = torch.load(path, weights_only=True)
        torch.save({k: v.to(dtype) for k, v in state.items()}, path)
    return root


@pytest.mark.parametrize(
    ("zeroshot_dtype", "finetuned_dtype"),
    [(torch.float32, torch.float16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_a_release_is_returned_in_the_dtype_of_its_zeroshot_checkpoint(tmp_path, zeroshot_dtype, finetuned_dtype):
    root = _half_precision_tall_release(tmp_path, zeroshot_dtype, finetuned_dtype)
    pretrained, finetuned, heads = load_tall_masks_release(root, TINY, TALL_TASKS, model_cfg=TINY_CFG)
    modules = [pretrained, *finetuned.values(), *heads.values()]  # the heads are float32 pickles
    assert {t.dtype for m in modules for t in m.state_dict().values() if t.is_floating_point()} == {zeroshot_dtype}
    file_state = torch.load(root / TINY / "CarsVal" / "nonlinear_finetuned.pt", weights_only=True)
    assert torch.equal(finetuned["Cars"].proj, file_state["model.visual.proj"].to(zeroshot_dtype))


# ---------------------------------------------------------------- open_clip towers by architecture


def _tiny_clip():
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_CFG.items() if k != "quick_gelu"}
    return open_clip.model.CLIP(**cfg, quick_gelu=True).eval()


@pytest.mark.parametrize("prefix", ["", "visual.", "model.visual.", "module.image_encoder.model.visual."])
def test_open_clip_encoder_loads_from_state_dicts_under_any_prefix(prefix):
    clip = _tiny_clip()
    state = {f"{prefix}{k}": v for k, v in clip.visual.state_dict().items()}
    encoder = load_open_clip_encoder(TINY_CFG, state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(x), clip.encode_image(x))


def test_open_clip_encoder_from_a_full_clip_ignores_the_text_tower_and_reads_the_activation():
    clip = _tiny_clip()
    encoder = load_open_clip_encoder({k: v for k, v in TINY_CFG.items() if k != "quick_gelu"}, clip)
    assert isinstance(encoder.transformer.resblocks[0].mlp.gelu, QuickGELU)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(x), clip.encode_image(x))


def test_a_text_tower_deeper_than_the_image_tower_is_not_mistaken_for_it():
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_CFG.items() if k != "quick_gelu"}
    clip = open_clip.model.CLIP(**{**cfg, "text_cfg": {**cfg["text_cfg"], "layers": 4}}).eval()
    encoder = load_open_clip_encoder(cfg, clip.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(x), clip.encode_image(x))


def test_open_clip_encoder_loads_safetensors_and_torch_files(tmp_path):
    from safetensors.torch import save_file

    clip = _tiny_clip()
    state = {f"visual.{k}": v.contiguous() for k, v in clip.visual.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    x = torch.randn(2, 3, 32, 32)
    for name in ("w.safetensors", "w.pt"):
        encoder = load_open_clip_encoder(TINY_CFG, tmp_path / name)
        with torch.no_grad():
            assert torch.equal(encoder(x), clip.encode_image(x))


def test_wrong_architecture_names_the_mismatch_and_guesses_the_real_one():
    state = build_open_clip_encoder("ViT-B-32", device="meta").state_dict()
    with pytest.raises(CheckpointError) as info:
        load_open_clip_encoder("ViT-B-16", state)
    message = str(info.value)
    assert "conv1.weight: checkpoint (768, 3, 32, 32) vs architecture (768, 3, 16, 16)" in message
    assert "looks like ViT-B-32" in message


def test_unexpected_keys_are_refused_unless_not_strict():
    clip = _tiny_clip()
    state = {f"model.visual.{k}": v for k, v in clip.visual.state_dict().items()}
    state["model.visual.extra_adapter.weight"] = torch.zeros(2)
    state["classifier.weight"] = torch.zeros(2)
    state["model.token_embedding.weight"] = torch.zeros(2)  # a known leftover: never reported
    with pytest.raises(CheckpointError) as info:
        load_open_clip_encoder(TINY_CFG, state)
    assert "model.visual.extra_adapter.weight" in str(info.value) and "classifier.weight" in str(info.value)
    assert "token_embedding" not in str(info.value)
    load_open_clip_encoder(TINY_CFG, state, strict=False)


def test_missing_keys_are_reported():
    state = dict(_tiny_clip().visual.state_dict())
    del state["proj"]
    with pytest.raises(CheckpointError, match="missing: proj"):
        load_open_clip_encoder(TINY_CFG, state)


def test_infer_open_clip_config_rebuilds_the_same_tower():
    encoder = load_open_clip_encoder(TINY_CFG, _tiny_clip())
    cfg = infer_open_clip_config(encoder)
    assert cfg["quick_gelu"] is True and cfg["embed_dim"] == 16
    rebuilt = build_open_clip_encoder(cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in encoder.state_dict().items()
    }


def test_an_in_memory_source_is_copied_not_shared(tmp_path):
    clip = _tiny_clip()
    state = {f"visual.{k}": v for k, v in clip.visual.state_dict().items()}
    from_module = load_open_clip_encoder(TINY_CFG, clip)
    from_state = load_open_clip_encoder(TINY_CFG, state)
    before = {k: v.clone() for k, v in from_module.state_dict().items()}
    with torch.no_grad():  # the user fine-tunes their own model in place afterwards
        for p in clip.parameters():
            p.add_(1.0)
    for encoder in (from_module, from_state):
        assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert from_module.proj.data_ptr() != clip.visual.proj.data_ptr()


def test_wrapped_state_dicts_are_unwrapped(tmp_path):
    clip = _tiny_clip()
    state = {f"visual.{k}": v for k, v in clip.visual.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "trainer.pt")
    for checkpoint in ({"state_dict": state}, {"model_state_dict": state, "step": 10}, tmp_path / "trainer.pt"):
        encoder = load_open_clip_encoder(TINY_CFG, checkpoint)
        with torch.no_grad():
            assert torch.equal(encoder(x), clip.encode_image(x))
    with pytest.raises(CheckpointError, match="mapping of names to tensors"):
        load_open_clip_encoder(TINY_CFG, {"epoch": 3, "weights": state})


# ---------------------------------------------------------------- safety


class _RunsCommand:
    """Unpickles into ``os.system(command)``: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _malicious_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    marker = tmp_path / "pwned"
    payload = _RunsCommand(f"touch {marker}")
    files = {"zip": tmp_path / "zip.pt", "legacy": tmp_path / "legacy.pt", "pickle": tmp_path / "plain.pkl"}
    torch.save({"state": payload}, files["zip"])
    torch.save({"state": payload}, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps(payload, protocol=2))
    return marker, files


def test_malicious_pickles_are_refused_naming_the_global_and_never_run(tmp_path):
    marker, files = _malicious_files(tmp_path)
    system = f"{os.system.__module__}.system"
    for path in files.values():
        for loader in (load_legacy_pickle, read_checkpoint):
            with pytest.raises(UnsafeCheckpointError, match=system.replace(".", r"\.")):
                loader(path)
        with pytest.raises(CheckpointError):
            load_state_dict_file(path)
        with pytest.raises(UnsafeCheckpointError):
            load_open_clip_encoder(TINY_CFG, path)
    assert not marker.exists()


def test_a_malicious_file_inside_a_release_is_refused(tmp_path):
    root = _copy_release(TV_ROOT, tmp_path)
    marker = tmp_path / "pwned"
    torch.save(_RunsCommand(f"touch {marker}"), root / TINY / "head_Cars.pt")
    with pytest.raises(UnsafeCheckpointError, match="head_Cars.pt"):
        load_task_vectors_release(root, TINY, ["Cars"], model_cfg=TINY_CFG)
    assert not marker.exists()


def test_unpickling_errors_are_also_pickle_errors():
    with pytest.raises(pickle.UnpicklingError):
        loads_restricted(b"cbuiltins\neval\n(Vprint(1)\ntR.")


def test_classes_of_known_namespaces_stay_inert_even_when_called(tmp_path):
    # A pickle calling open_clip's downloader gets an inert stand-in back: no code of it runs.
    obj = loads_restricted(b"copen_clip.pretrained\ndownload_pretrained_from_url\n(Vhttp://example.invalid\ntR.")
    assert isinstance(obj, LegacyObject)
    assert obj._legacy_args == ("http://example.invalid",)


def test_state_dicts_are_read_weights_only_and_whole_object_pickles_are_pointed_elsewhere():
    with pytest.raises(CheckpointError, match="load_legacy_pickle"):
        load_state_dict_file(TV_ROOT / TINY / "zeroshot.pt")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:100], id="truncated-header"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"<!DOCTYPE html><html>Too many requests</html>", id="html"),
        pytest.param(lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", id="lfs"),
        pytest.param(lambda data: b"\x80\x02" + data[2:40], id="broken-pickle"),
    ],
)
def test_truncated_or_corrupt_files_get_an_error_naming_the_file(tmp_path, content):
    root = _copy_release(TV_ROOT, tmp_path)
    path = root / TINY / "zeroshot.pt"
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(CorruptCheckpointError) as info:
        load_task_vectors_release(root, TINY, ["MNIST"], model_cfg=TINY_CFG)
    assert str(path) in str(info.value)
    assert "download" in str(info.value)


def test_truncated_state_dict_and_safetensors_get_the_same_error(tmp_path):
    from safetensors.torch import save_file

    state_path = tmp_path / "nonlinear_finetuned.pt"
    data = (TALL_ROOT / TINY / "CarsVal" / "nonlinear_finetuned.pt").read_bytes()
    state_path.write_bytes(data[: len(data) - 200])
    st_path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(1000)}, st_path)
    st_path.write_bytes(st_path.read_bytes()[:-100])
    for path in (state_path, st_path):
        with pytest.raises(CorruptCheckpointError, match=str(path).replace(".", r"\.")):
            load_state_dict_file(path)


# TorchScript archives: torch.load(weights_only=False) hands them to torch.jit.load, which runs their code.


class _Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w


def _torchscript_file(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* is deprecated, still what such files are made with
        torch.jit.save(torch.jit.script(_Scripted()), path)
    return path


def test_torchscript_archives_are_refused_before_torch_jit_load_runs(tmp_path, monkeypatch):
    path = _torchscript_file(tmp_path / "scripted.pt")
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: calls.append(args))
    loaders = (read_checkpoint, load_legacy_pickle, load_state_dict_file, lambda p: load_open_clip_encoder(TINY_CFG, p))
    for loader in loaders:
        with pytest.raises(UnsafeCheckpointError, match="TorchScript") as info:
            loader(path)
        assert str(path) in str(info.value)
    # The same archive as bytes: a storage of a plain pickle, or a file object.
    data = path.read_bytes()
    nested = b"\x80\x03ctorch.storage\n_load_from_bytes\nB" + len(data).to_bytes(4, "little") + data + b"\x85R."
    (tmp_path / "nested.pkl").write_bytes(nested)
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        load_legacy_pickle(tmp_path / "nested.pkl")
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        torch_load_restricted(io.BytesIO(data))
    assert calls == []


# BUILD (set an object's state) on the shared objects find_class returns would change them for the process.
_POISON_DEFAULTS = (  # _rebuild_tensor_v2.__defaults__ = ({"neg": True},): every later tensor load negated
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__}X\x03\x00\x00\x00negI01\ns\x85s\x86b."
)
_POISON_LAYOUT_CACHE = (  # torch.serialization._get_layout.cache = {"torch.strided": set}
    b"\x80\x02ctorch.serialization\n_get_layout\nN}X\x05\x00\x00\x00cache}X\x0d\x00\x00\x00torch.strided"
    b"cbuiltins\nset\nss\x86b."
)
_POISON_STAND_IN_CLASS = (  # ClassificationHead stand-in class .__setstate__ = frozenset
    b"\x80\x02csrc.modeling\nClassificationHead\nN}X\x0c\x00\x00\x00__setstate__cbuiltins\nfrozenset\ns\x86b."
)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_POISON_DEFAULTS, id="function-defaults"),
        pytest.param(_POISON_LAYOUT_CACHE, id="function-attribute"),
        pytest.param(_POISON_STAND_IN_CLASS, id="stand-in-class"),
    ],
)
def test_build_on_shared_functions_and_classes_is_refused_and_changes_nothing(tmp_path, payload):
    from momaestimator.checkpoints import safe_pickle

    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    cache = dict(getattr(torch.serialization._get_layout, "cache", {}))
    with pytest.raises(UnsafeCheckpointError, match="BUILD"):
        loads_restricted(payload)
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match="evil.pkl"):
        read_checkpoint(path)
    # The same pickle as the data.pkl of a torch.save archive: its globals are all torch's allowed ones.
    archive = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2)}, tmp_path / "genuine.pt")
    with zipfile.ZipFile(tmp_path / "genuine.pt") as src, zipfile.ZipFile(archive, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, payload if info.filename.endswith("/data.pkl") else src.read(info))
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        read_checkpoint(archive)

    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults
    assert dict(getattr(torch.serialization._get_layout, "cache", {})) == cache
    assert all("__setstate__" not in vars(cls) for cls in safe_pickle._STAND_IN_CLASSES.values())
    genuine = tmp_path / "state.pt"
    torch.save({"w": torch.tensor([1.0, 2.0, 3.0])}, genuine)
    for loader in (read_checkpoint, load_legacy_pickle, lambda p: torch.load(p, weights_only=True)):
        assert torch.equal(loader(genuine)["w"], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_pickles_of_every_protocol_load_with_their_state(tmp_path, protocol):
    # The task_vectors code's older files are pickle.dump(module): protocol 2 stores bytes through
    # _codecs.encode, protocols 0 and 1 have no 0x80 header and are still pickles, not corrupt files.
    head = nn.Linear(16, 3)
    head.normalize = True
    head.temperature = np.float64(0.07)  # a numpy scalar attribute: a numpy dtype is BUILT
    path = tmp_path / f"head_p{protocol}.pt"
    path.write_bytes(pickle.dumps(head, protocol=protocol))
    for loader in (load_legacy_pickle, read_checkpoint):
        loaded = loader(path)
        assert isinstance(loaded, LegacyObject) and loaded.temperature == 0.07
        converted = head_from_checkpoint(loaded)
        assert converted.normalize and torch.equal(converted.weight, head.weight.detach())
    state = tmp_path / f"state_p{protocol}.pt"
    torch.save(head.state_dict(), state, _use_new_zipfile_serialization=False, pickle_protocol=max(protocol, 1))
    # torch's weights_only unpickler (load_state_dict_file) reads only its own default, protocol 2.
    for loader in (read_checkpoint, load_legacy_pickle) + ((load_state_dict_file,) if protocol == 2 else ()):
        loaded = loader(state)
        assert torch.equal(loaded["bias"], head.bias.detach())
    # OrderedDict state (a state dict's _metadata) is still restored.
    assert load_legacy_pickle(state)._metadata == head.state_dict()._metadata


def _write_safetensors(path: Path, tensors: dict, header_length: int) -> Path:
    """A safetensors file written by hand, its JSON header padded with spaces to ``header_length`` bytes."""
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = tensor.detach().contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    assert len(text) <= header_length
    path.write_bytes(header_length.to_bytes(8, "little") + text.ljust(header_length) + b"".join(blobs))
    return path


@pytest.mark.parametrize("first_byte", [0x80, 0x3C, 0x7B])  # a pickle's header, "<" of an HTML page, "{"
def test_safetensors_files_are_recognised_whatever_their_header_length(tmp_path, first_byte):
    from safetensors.torch import load_file

    state = {f"visual.{k}": v for k, v in _tiny_clip().visual.state_dict().items()}
    path = _write_safetensors(tmp_path / "w.safetensors", state, 0x1000 + first_byte)
    assert path.read_bytes()[0] == first_byte
    assert load_file(path).keys() == state.keys()  # a valid file
    for loader in (read_checkpoint, load_state_dict_file, load_legacy_pickle):
        loaded = loader(path)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    encoder = load_open_clip_encoder(TINY_CFG, path)
    assert torch.equal(encoder.proj, state["visual.proj"])


def test_safetensors_from_the_writer_with_a_0x80_header_length(tmp_path):
    from safetensors.torch import save_file

    head = {"weight": torch.randn(5, 16), "bias": torch.zeros(5)}
    path = tmp_path / "head.safetensors"
    for pad in range(300):  # the writer aligns its header to 8 bytes: 0x80 is reachable
        save_file(head, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(read_checkpoint(path)["weight"], head["weight"])
    assert head_from_checkpoint(read_checkpoint(path)).out_features == 5


# ---------------------------------------------------------------- saving


def _merged_tiny(tv_release) -> MergedModel:
    pretrained, _, heads = tv_release
    return MergedModel(pretrained, heads).eval()


def test_merged_model_round_trips_bit_identically(tmp_path, tv_release):
    model = _merged_tiny(tv_release)
    out = save_merged_model(model, tmp_path / "merged", architecture=TINY_CFG)
    description = json.loads((out / "model.json").read_text())
    assert description["encoder"]["quick_gelu"] is True
    assert description["heads"]["MNIST"] == {
        "type": "LinearHead",
        "n_classes": 10,
        "n_features": 16,
        "normalize": True,
    }
    loaded = load_merged_model(out)
    assert isinstance(loaded.encoder, VisionTransformer) and loaded.tasks == model.tasks
    assert all(isinstance(head, LinearHead) for head in loaded.heads.values())
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert original[key].dtype == restored[key].dtype and torch.equal(original[key], restored[key]), key
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(model(x, t), loaded(x, t)) for t in model.tasks)


def test_merged_model_architecture_by_name_or_inferred(tmp_path):
    torch.manual_seed(0)
    encoder = build_open_clip_encoder("ViT-B-32", quick_gelu=True)
    model = MergedModel(encoder, {"a": nn.Linear(512, 3)})
    out = save_merged_model(model, tmp_path / "named", architecture="ViT-B-32")
    assert json.loads((out / "model.json").read_text())["encoder"]["model_name"] == "ViT-B-32"
    loaded = load_merged_model(out / "model.safetensors")
    assert type(loaded.heads["a"]) is nn.Linear and loaded.heads["a"].bias is not None  # as saved
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    inferred = json.loads((save_merged_model(model, tmp_path / "inferred") / "model.json").read_text())
    assert inferred["encoder"]["model_cfg"]["vision_cfg"]["patch_size"] == 32
    with pytest.raises(ValueError, match="architecture"):
        save_merged_model(model, tmp_path / "wrong", architecture="ViT-B-16")


def test_a_crash_while_saving_leaves_the_previous_files_intact(tmp_path, tv_release, monkeypatch):
    import safetensors.torch

    model = _merged_tiny(tv_release)
    out = save_merged_model(model, tmp_path / "merged", architecture=TINY_CFG)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        model.encoder.proj.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_merged_model(model, out, architecture=TINY_CFG)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_atomic_write_replaces_whole_files_only(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write(target, lambda p: Path(p).write_text("first"))

    def fail(p):
        Path(p).write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_truncated_merged_model_gets_a_clear_error(tmp_path, tv_release):
    out = save_merged_model(_merged_tiny(tv_release), tmp_path / "m", architecture=TINY_CFG)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-500])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_merged_model(out)


def test_loading_another_file_as_a_merged_model_says_it_is_not_one(tmp_path):
    path = TV_ROOT / TINY / "zeroshot.pt"
    with pytest.raises(CheckpointError, match="not a merged model") as info:
        load_merged_model(path)
    assert not isinstance(info.value, CorruptCheckpointError) and str(path) in str(info.value)


# ---------------------------------------------------------------- with MOMAMerger


def test_merger_fits_on_a_loaded_release_and_its_merged_model_round_trips(tmp_path, tv_release):
    from momaestimator.merger import MOMAMerger

    pretrained, finetuned, heads = tv_release
    generator = torch.Generator().manual_seed(0)
    data = {t: torch.randn(8, 3, 32, 32, generator=generator) for t in TV_TASKS}
    merger = MOMAMerger(pretrained, finetuned, heads, n_steps=3, batch_size=4, random_state=0).fit(data)
    merged = merger.transform()
    out = save_merged_model(merged, tmp_path / "merged", architecture=TINY_CFG)
    loaded = load_merged_model(out)
    for key, value in merged.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


@pytest.mark.parametrize(
    ("root", "finetuned_file"),
    [(TV_ROOT, "{task}/finetuned.pt"), (TALL_ROOT, "{task}Val/nonlinear_finetuned.pt")],
    ids=["task_vectors whole-object pickles", "tall_masks model.* state dicts"],
)
def test_release_files_as_lazy_expert_paths_give_the_fit_of_the_loaded_modules(tv_release, root, finetuned_file):
    from momaestimator.merger import MOMAMerger

    pretrained, finetuned, heads = tv_release
    paths = {t: root / TINY / finetuned_file.format(task=t) for t in TV_TASKS if t != "SUN397"}
    if root is TALL_ROOT:
        _, finetuned, _ = load_tall_masks_release(TALL_ROOT, TINY, list(paths), model_cfg=TINY_CFG)
    heads = {t: heads[t] for t in paths}
    generator = torch.Generator().manual_seed(0)
    data = {t: torch.randn(6, 3, 32, 32, generator=generator) for t in paths}
    fit = {"n_steps": 2, "batch_size": 3, "random_state": 0, "validation_fraction": 0.0}
    lazy = MOMAMerger(pretrained, paths, heads, **fit).fit(data)  # file formats read onto the tower's keys
    eager = MOMAMerger(pretrained, {t: finetuned[t] for t in paths}, heads, **fit).fit(data)
    assert all(torch.equal(lazy.mask_[k], eager.mask_[k]) for k in eager.mask_)
    assert all(torch.equal(lazy.rotations_[t], eager.rotations_[t]) for t in paths)
    merged = lazy.merged_state_dict()
    assert all(torch.equal(merged[k], v) for k, v in eager.merged_state_dict().items())


# ---------------------------------------------------------------- the command


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["merge", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    merge = next(a for a in _build_parser()._subparsers._group_actions[0].choices.values())
    for action in merge._actions:
        if action.option_strings:
            assert action.help, action.option_strings
            assert action.option_strings[-1] in text


def _check_command_output(out_dir: Path, printed: str, tasks):
    assert "agreement with each task's fine-tuned expert" in printed
    for task in tasks:
        assert task in printed
    report = json.loads((out_dir / "merge_report.json").read_text())
    assert [row["task"] for row in report["agreement"]] == list(tasks)
    assert all(0.0 <= row["merged"] <= 1.0 for row in report["agreement"])
    model = load_merged_model(out_dir)
    assert model.tasks == list(tasks)


def test_merge_command_on_a_task_vectors_release_with_npz_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    np.savez(
        npz,
        **{name: rng.standard_normal((6, 3, 32, 32)).astype(np.float32) for name in ("sun397", "cars", "mnist")},
    )
    args = ["merge", "--release", "task_vectors", "--root", str(TV_ROOT), "--model", TINY]
    args += ["--model-config", str(FIXTURES / "tiny-ViT.json"), "--tasks", *TV_TASKS, "--data", str(npz)]
    args += ["--out", str(tmp_path / "out"), "--n-steps", "2", "--batch-size", "3", "--quiet"]
    assert main(args) == 0
    _check_command_output(tmp_path / "out", capsys.readouterr().out, TV_TASKS)


def test_merge_command_on_a_tall_masks_release_with_image_folders(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for task in ("cars", "DTD", "mnist"):
        folder = tmp_path / "images" / task
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    args = ["merge", "--release", "tall_masks", "--root", str(TALL_ROOT), "--model", TINY]
    args += ["--model-config", str(FIXTURES / "tiny-ViT.json"), "--tasks", *TALL_TASKS]
    args += ["--data", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--n-steps", "2", "--quiet"]
    assert main(args) == 0
    _check_command_output(tmp_path / "out", capsys.readouterr().out, TALL_TASKS)


def test_merge_command_reports_missing_checkpoints_without_a_traceback(tmp_path, capsys):
    args = ["merge", "--release", "task_vectors", "--root", str(TV_ROOT), "--model", TINY, "--tasks", "DTD"]
    args += [
        "--model-config",
        str(FIXTURES / "tiny-ViT.json"),
        "--data",
        str(_npz(tmp_path / "dtd.npz", names=("dtd",))),
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "DTD/finetuned.pt" in capsys.readouterr().err


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    return path


def _npz(path: Path, names=("sun397", "cars", "mnist"), n=4) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, **{name: rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for name in names})
    return path


def _command(tmp_path: Path, *extra: str, release="task_vectors", root=TV_ROOT, tasks=TV_TASKS) -> list[str]:
    args = ["merge", "--release", release, "--root", str(root), "--model", TINY]
    args += ["--model-config", str(FIXTURES / "tiny-ViT.json"), "--tasks", *tasks]
    args += ["--data", str(_npz(tmp_path / "data.npz")), "--out", str(tmp_path / "out"), "--n-steps", "1", "--quiet"]
    return args + list(extra)


def _replace(args: list[str], option: str, *values: str) -> list[str]:
    """``args`` with the values of ``option`` replaced (or the option removed when no values are given)."""
    i = args.index(option)
    end = i + 1
    while end < len(args) and not args[end].startswith("--"):
        end += 1
    return args[:i] + ([option, *values] if values else []) + args[end:]


@pytest.fixture
def no_loading(monkeypatch):
    from momaestimator.checkpoints import cli

    for name in list(cli._RELEASES):
        monkeypatch.setitem(cli._RELEASES, name, lambda *a, **k: pytest.fail("a checkpoint was loaded"))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--sparsity", "1.5"),
        ("--sparsity", "-0.2"),
        ("--sparsity", "nan"),
        ("--batch-size", "0"),
        ("--max-per-task", "-1"),
        ("--max-per-task", "0"),
        ("--n-steps", "-3"),
        ("--n-steps", "two"),
        ("--seed", "-1"),
    ],
)
def test_merge_command_rejects_out_of_range_parameters_when_parsing(tmp_path, capsys, no_loading, option, value):
    with pytest.raises(SystemExit) as info:
        main(_command(tmp_path, option, value))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and value in err and "Traceback" not in err


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    args = _command(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "partial.json").write_text('{"embed_dim": 16}')
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _npz(tmp_path / "two.npz", names=("sun397", "cars"))
    for task in ("SUN397", "Cars", "MNIST"):
        (tmp_path / "images" / task).mkdir(parents=True)
        _png(tmp_path / "images" / task / "a.png")
    (tmp_path / "images" / "MNIST" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    no_gpu = f"cuda:{torch.cuda.device_count()}"
    return {
        "unknown architecture": (_replace(_replace(args, "--model", "NotAnArch"), "--model-config"), "NotAnArch"),
        "task count for task_vectors": (_replace(args, "--tasks", "8"), "--tasks 8"),
        "invalid JSON": (_replace(args, "--model-config", str(tmp_path / "bad.json")), "not valid JSON"),
        "missing config": (_replace(args, "--model-config", str(tmp_path / "nope.json")), "nope.json"),
        "config without vision_cfg": (_replace(args, "--model-config", str(tmp_path / "partial.json")), "vision_cfg"),
        "out is a file": (_replace(args, "--out", str(tmp_path / "a_file")), "a_file"),
        "out under a file": (_replace(args, "--out", str(tmp_path / "a_file" / "out")), "a_file"),
        "no such GPU": (args + ["--device", no_gpu], f"--device {no_gpu}"),
        "not a device": (args + ["--device", "gpu-please"], "gpu-please"),
        "missing data": (_replace(args, "--data", str(tmp_path / "nope")), "nope"),
        "corrupt npz": (_replace(args, "--data", str(tmp_path / "corrupt.npz")), "cannot read it as an .npz"),
        "npz without a task": (_replace(args, "--data", str(tmp_path / "two.npz")), "no samples for tasks ['MNIST']"),
        "unreadable image": (_replace(args, "--data", str(tmp_path / "images")), "broken.png: cannot read the image"),
        "misspelt task": (
            _replace(args, "--tasks", "SUN397", "Cars", "MINST"),
            "no samples for tasks ['MINST']; it must cover ['SUN397', 'Cars', 'MINST']; 'MINST' is not a task of "
            "the releases (did you mean 'MNIST'?)",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown architecture",
        "task count for task_vectors",
        "invalid JSON",
        "missing config",
        "config without vision_cfg",
        "out is a file",
        "out under a file",
        "no such GPU",
        "not a device",
        "missing data",
        "corrupt npz",
        "npz without a task",
        "unreadable image",
        "misspelt task",
    ],
)
def test_merge_command_reports_bad_inputs_before_loading_without_a_traceback(tmp_path, capsys, no_loading, case):
    args, expected = _bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("momaestimator: error: ") and expected in err and "Traceback" not in err


def test_merge_command_reports_release_errors_without_a_traceback(tmp_path, capsys):
    args = _command(tmp_path, release="tall_masks", root=TALL_ROOT, tasks=["9"])
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("momaestimator: error: ") and "8, 14, 20" in err


def test_merge_command_on_a_half_precision_release(tmp_path, capsys):
    root = _half_precision_tall_release(tmp_path, torch.float16, torch.float16)
    args = _command(tmp_path, release="tall_masks", root=root, tasks=TALL_TASKS)
    args = _replace(args, "--data", str(_npz(tmp_path / "half.npz", names=("cars", "dtd", "mnist"))))
    assert main(args) == 0
    _check_command_output(tmp_path / "out", capsys.readouterr().out, TALL_TASKS)
    assert load_merged_model(tmp_path / "out").encoder.proj.dtype == torch.float16


def test_merge_command_expands_a_tilde_in_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _copy_release(TV_ROOT, tmp_path)
    shutil.copy(FIXTURES / "tiny-ViT.json", tmp_path / "tiny.json")
    args = _command(tmp_path)
    for option, value in (("--root", "~/task_vectors"), ("--model-config", "~/tiny.json")):
        args = _replace(args, option, value)
    args = _replace(_replace(args, "--data", "~/data.npz"), "--out", "~/out")
    assert main(args) == 0
    _check_command_output(tmp_path / "out", capsys.readouterr().out, TV_TASKS)


def test_python_dash_m_momaestimator_runs_the_command(capsys, monkeypatch):
    import runpy

    import momaestimator

    # What ``python -m momaestimator`` runs (run_path: pytest's import hook may own the module).
    main_file = Path(momaestimator.__file__).parent / "__main__.py"
    monkeypatch.setattr(sys, "argv", ["momaestimator", "merge", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(main_file), run_name="__main__")
    assert info.value.code == 0
    assert "--release" in capsys.readouterr().out


# ---------------------------------------------------------------- real size: ViT-B-32, 8 tasks


def _release_classes():
    """Stand-ins for the release's ``src.modeling`` classes, to write real whole-object pickles."""
    module = types.ModuleType("src.modeling")

    class ImageEncoder(nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.model = clip
            self.cache_dir = None
            delattr(self.model, "transformer")  # as the release: text tower deleted, leftovers kept

        def forward(self, images):
            return self.model.encode_image(images)

    class ClassificationHead(nn.Linear):
        def __init__(self, normalize, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.normalize = normalize
            self.weight = nn.Parameter(weights.clone())
            self.bias = nn.Parameter(torch.zeros_like(self.bias))

    for cls in (ImageEncoder, ClassificationHead):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    package = types.ModuleType("src")
    package.modeling = module
    return package, module


@pytest.fixture(scope="module")
def vit_b_32_release(tmp_path_factory):
    """The task_vectors layout for ViT-B-32 and 8 tasks, random weights; with the visual tensors' digests."""
    root = tmp_path_factory.mktemp("checkpoints")
    digests = {}
    with pytest.MonkeyPatch.context() as patch:
        package, modeling = _release_classes()
        patch.setitem(sys.modules, "src", package)
        patch.setitem(sys.modules, "src.modeling", modeling)
        torch.manual_seed(0)
        clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
        encoder = modeling.ImageEncoder(clip).eval()
        (root / "ViT-B-32").mkdir()
        torch.save(encoder, root / "ViT-B-32" / "zeroshot.pt")
        digests["pretrained"] = _tensor_digest(encoder.model.visual.state_dict())
        for task in TASK_VECTORS_TASKS:
            with torch.no_grad():  # each expert: the previous weights plus a small update
                for p in encoder.model.visual.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
            (root / "ViT-B-32" / task).mkdir()
            torch.save(encoder, root / "ViT-B-32" / task / "finetuned.pt")
            digests[task] = _tensor_digest(encoder.model.visual.state_dict())
            head = modeling.ClassificationHead(True, nn.functional.normalize(torch.randn(5, 512), dim=-1) * 100)
            torch.save(head, root / "ViT-B-32" / f"head_{task}.pt")
    return root, digests


@pytest.mark.slow
def test_vit_b_32_release_with_8_tasks_loads_back_equal(vit_b_32_release):
    root, digests = vit_b_32_release
    assert "src.modeling" not in sys.modules
    pretrained, finetuned, heads = load_task_vectors_release(root, "ViT-B-32")
    assert list(finetuned) == list(heads) == list(TASK_VECTORS_TASKS)
    assert _tensor_digest(pretrained.state_dict()) == digests["pretrained"]
    for task in TASK_VECTORS_TASKS:
        assert _tensor_digest(finetuned[task].state_dict()) == digests[task], task
        assert isinstance(finetuned[task].transformer.resblocks[0].mlp.gelu, QuickGELU)
        assert heads[task].weight.shape == (5, 512) and heads[task].normalize


@pytest.mark.slow
def test_merger_fits_on_the_vit_b_32_release_and_its_merged_model_round_trips(vit_b_32_release, tmp_path):
    from momaestimator.merger import MOMAMerger

    pretrained, finetuned, heads = load_task_vectors_release(vit_b_32_release[0], "ViT-B-32")
    generator = torch.Generator().manual_seed(0)
    data = {t: torch.randn(2, 3, 224, 224, generator=generator) for t in TASK_VECTORS_TASKS}
    merger = MOMAMerger(pretrained, finetuned, heads, n_steps=1, batch_size=1, validation_fraction=0.0, random_state=0)
    merged = merger.fit(data).transform()
    assert merger.n_iter_ == 1
    out = save_merged_model(merged, tmp_path / "merged", architecture="ViT-B-32")
    loaded = load_merged_model(out)
    assert _tensor_digest(loaded.state_dict()) == _tensor_digest(merged.state_dict())


@pytest.mark.parametrize("bias", [True, False])
def test_linear_heads_come_back_as_they_were_saved(tmp_path, bias):
    torch.manual_seed(0)
    encoder = build_open_clip_encoder(TINY_CFG)
    model = MergedModel(encoder, {"a": nn.Linear(16, 3, bias=bias), "b": LinearHead(torch.randn(2, 16))})
    out = save_merged_model(model, tmp_path / "m", architecture=TINY_CFG)
    loaded = load_merged_model(out)
    assert type(loaded.heads["a"]) is nn.Linear and (loaded.heads["a"].bias is not None) == bias
    assert isinstance(loaded.heads["b"], LinearHead)
    assert loaded.state_dict().keys() == model.state_dict().keys()  # no bias added: the same parameters
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert json.loads((out / "model.json").read_text())["format_version"] == 2
    only_linear_head = MergedModel(encoder, {"b": LinearHead(torch.randn(2, 16))})
    assert (
        json.loads(
            (save_merged_model(only_linear_head, tmp_path / "v1", architecture=TINY_CFG) / "model.json").read_text()
        )["format_version"]
        == 1
    )


# ---------------------------------------------------------------- files crafted to exhaust or hang the loader
def _legacy_tar(path: Path, member) -> Path:
    """torch.save's pre-0.4 tar format, whose first member's name is a pickle of torch's magic number."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        first = tarfile.TarInfo(f"L{torch.serialization.MAGIC_NUMBER}L\n.")
        tar.addfile(first, io.BytesIO(b""))
        tar.addfile(member)
    return path


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_the_pre_0_4_tar_format_is_refused_before_extraction(tmp_path, kind):
    import tarfile

    member = tarfile.TarInfo("storages")
    if kind == "fifo":  # extracting it opens a named pipe: the load would block forever
        member.type = tarfile.FIFOTYPE
    else:  # extracting it reads any local file
        member.type, member.linkname = tarfile.SYMTYPE, str(TV_ROOT / TINY / "zeroshot.pt")
    path = _legacy_tar(tmp_path / "old.pt", member)
    for loader in (load_legacy_pickle, read_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match="tar archive") as info:
            loader(path)
        assert str(info.value).count(str(path)) == 1


def test_an_expanded_tensor_is_refused_before_anything_copies_it(tmp_path):
    # 4 bytes of data declared as 2**20 x 16 floats (64 MB once a head copies it)
    expanded = torch.ones(1).expand(2**20, 16)
    files = {"zip": tmp_path / "zip.pt", "legacy": tmp_path / "legacy.pt"}
    torch.save({"weight": expanded}, files["zip"])
    torch.save({"weight": expanded}, files["legacy"], _use_new_zipfile_serialization=False)
    for name, path in files.items():
        loaders = (read_checkpoint, load_legacy_pickle) + ((load_state_dict_file,) if name == "zip" else ())
        for loader in loaders:
            with pytest.raises(UnsafeCheckpointError, match="views 16777216 elements of a storage of 1"):
                loader(path)
    root = _copy_release(TV_ROOT, tmp_path)
    head = nn.Linear(16, 10)
    head.weight = nn.Parameter(torch.ones(1).expand(10, 16))
    torch.save(head, root / TINY / "head_MNIST.pt")
    with pytest.raises(UnsafeCheckpointError, match="head_MNIST.pt"):
        load_task_vectors_release(root, TINY, ["MNIST"], model_cfg=TINY_CFG)
    # views of a larger storage (slices of one tensor) are ordinary and load
    base = torch.arange(12.0)
    torch.save({"a": base[:4], "b": base[4:].view(2, 4)}, files["zip"])
    loaded = read_checkpoint(files["zip"])
    assert torch.equal(loaded["b"], base[4:].view(2, 4))


def _reduce(module: str, name: str, *args) -> bytes:
    """A protocol-2 pickle calling ``module.name(*args)`` (args: ints and str)."""
    body = b"".join(pickle.dumps(a, protocol=2)[2:-1] for a in args)
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + body + b"tR."


def test_allowed_callables_refuse_arguments_that_cost_more_than_the_file(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match="bytearray"):
        loads_restricted(_reduce("builtins", "bytearray", 2**31))  # 34 bytes asking for 2 GiB
    with pytest.raises(UnsafeCheckpointError, match="punycode"):
        loads_restricted(_reduce("_codecs", "encode", "ä" * 20, "punycode"))
    # what honest protocol-2 pickles hold: bytes and bytearrays as latin1 text
    assert loads_restricted(pickle.dumps(bytearray(b"\x00\xff"), protocol=2)) == bytearray(b"\x00\xff")
    assert loads_restricted(pickle.dumps({"b": b"\x00\xffab"}, protocol=2)) == {"b": b"\x00\xffab"}


def test_a_compressed_zip_entry_is_refused_before_it_inflates(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1000)}, plain)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w") as out:
        for info in src.infolist():
            kind = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            out.writestr(info.filename, src.read(info.filename), compress_type=kind)
    for loader in (read_checkpoint, load_legacy_pickle, load_state_dict_file, torch_load_restricted):
        with pytest.raises(UnsafeCheckpointError, match="compressed"):
            loader(packed)
    assert torch.equal(read_checkpoint(plain)["w"], torch.zeros(1000))


def test_a_module_tree_nested_thousands_deep_gets_a_checkpoint_error(tmp_path):
    level = b"csrc.modeling\nM\n)\x81}(X\x0b\x00\x00\x00_parameters}X\x08\x00\x00\x00_modules}(X\x01\x00\x00\x00m"
    leaf = b"csrc.modeling\nM\n)\x81}(X\x0b\x00\x00\x00_parameters}X\x08\x00\x00\x00_modules}ub"
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02" + level * 3000 + leaf + b"uub" * 3000 + b".")
    obj = load_legacy_pickle(path)
    with pytest.raises(TypeError, match="nested more than"):
        legacy_state_dict(obj)
    root = _copy_release(TV_ROOT, tmp_path)
    shutil.copy(path, root / TINY / "zeroshot.pt")
    with pytest.raises(CheckpointError, match="zeroshot.pt"):
        load_task_vectors_release(root, TINY, ["MNIST"], model_cfg=TINY_CFG)


def test_every_truncation_of_a_legacy_file_is_reported_as_damage_not_as_an_attack(tmp_path):
    full = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, full, _use_new_zipfile_serialization=False)
    data = full.getvalue()
    path = tmp_path / "cut.pt"
    for n in range(1, len(data)):
        path.write_bytes(data[:n])
        for loader in (load_legacy_pickle, read_checkpoint):
            try:
                loader(path)
            except UnsafeCheckpointError as err:
                pytest.fail(f"cut at {n} of {len(data)} bytes reported as unsafe: {err}")
            except CheckpointError:
                continue
            pytest.fail(f"cut at {n} of {len(data)} bytes loaded")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's legacy loader compares module sources
@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_damaged_files_only_ever_raise_checkpoint_errors_naming_the_file(tmp_path, fmt):
    rng = np.random.default_rng(0)
    source = io.BytesIO()
    if fmt == "pickle":
        source.write(pickle.dumps({"a": [1, 2.5, "x"], "b": {3}, "c": b"\x00"}, protocol=0))
    else:
        torch.save(nn.Sequential(nn.Linear(3, 2)), source, _use_new_zipfile_serialization=fmt == "zip")
    data = source.getvalue()
    start = 0
    if fmt == "zip":  # flip bytes of the pickle inside the archive, keep the archive readable
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            infos = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    path = tmp_path / "damaged.pt"
    for _ in range(120):
        if fmt == "zip":
            pkl = bytearray(infos[name])
            pkl[rng.integers(len(pkl))] = rng.integers(256)
            with zipfile.ZipFile(path, "w") as out:
                for n, content in infos.items():
                    out.writestr(n, bytes(pkl) if n == name else content)
        else:
            damaged = bytearray(data)
            damaged[rng.integers(start, len(damaged))] = rng.integers(256)
            path.write_bytes(bytes(damaged))
        for loader in (load_legacy_pickle, read_checkpoint):
            try:
                loader(path)
            except CheckpointError as err:
                assert str(path) in str(err)
            # any other exception fails the test


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"weight": torch.ones(10, 16, dtype=torch.int64)}, "torch.int64"),
        ({"weight": torch.ones(0, 16)}, r"\(0, 16\)"),
        ({"weight": torch.ones(10, 16), "bias": torch.ones(7)}, "bias"),
    ],
    ids=["integer", "no-class", "bias-length"],
)
def test_heads_that_cannot_classify_are_refused_naming_the_file(tmp_path, capsys, state, match):
    root = _copy_release(TV_ROOT, tmp_path)
    torch.save(state, root / TINY / "head_MNIST.pt")
    with pytest.raises(CheckpointError, match=match) as info:
        load_task_vectors_release(root, TINY, TV_TASKS, model_cfg=TINY_CFG)
    assert "head_MNIST.pt" in str(info.value)
    args = _replace(_command(tmp_path, root=str(root)), "--root", str(root))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("momaestimator: error: ")


@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: "{not json",
        lambda meta: json.dumps({k: v for k, v in json.loads(meta).items() if k != "encoder"}),
        lambda meta: json.dumps({**json.loads(meta), "tasks": 5}),
    ],
    ids=["not-json", "no-encoder", "tasks-not-a-list"],
)
@pytest.mark.filterwarnings("ignore:.*differs from the description")
def test_a_merged_model_with_a_malformed_description_gets_a_checkpoint_error(tmp_path, tv_release, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "merged"
    save_merged_model(_merged_tiny(tv_release), out, architecture=TINY_CFG)
    weights = out / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(weights), metadata={**meta, "momaestimator": edit(meta["momaestimator"])})
    with pytest.raises(CheckpointError, match="malformed") as info:
        load_merged_model(out)
    assert str(weights) in str(info.value)


class _Restrided:
    """Pickles as a checked 1-element tensor that BUILD then re-strides to 10**10 elements."""

    def __reduce__(self):
        storage = torch.ones(1).storage()
        args = (storage, 0, (1,), (1,), False, __import__("collections").OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args, (storage, 0, (100_000, 100_000), (0, 0)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # TypedStorage is deprecated
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_tensor_restrided_by_build_is_checked_too(tmp_path, protocol):
    path = tmp_path / "restrided.pkl"
    path.write_bytes(pickle.dumps({"weight": _Restrided()}, protocol=protocol))
    for loader in (read_checkpoint, load_legacy_pickle):
        with pytest.raises(UnsafeCheckpointError, match="views 10000000000 elements of a storage of 1"):
            loader(path)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta", "ignore:Validating sparse tensor")
def test_sparse_and_other_honest_tensors_still_load(tmp_path):
    dense = torch.arange(12.0).view(3, 4)
    state = {
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "empty": torch.zeros(0, 5),
        "transposed": dense.t(),
        "slice": dense[1:, ::2],
        "half": dense.half(),
        "broadcast_row": torch.ones(1, 4).expand(1, 4),
    }
    path = tmp_path / "honest.pt"
    torch.save(state, path)
    for loader in (read_checkpoint, load_state_dict_file):  # state dicts: read weights-only
        loaded = loader(path)
        assert all(torch.equal(loaded[k].to_dense(), v.to_dense()) for k, v in state.items())
    dense_only = {k: v for k, v in state.items() if v.layout == torch.strided}
    torch.save(dense_only, path)
    loaded = load_legacy_pickle(path)  # the restricted unpickler (release pickles hold no sparse tensors)
    assert all(torch.equal(loaded[k], v) for k, v in dense_only.items())


@pytest.mark.parametrize("prefixes", [("teacher.visual.", "student.visual."), ("model.visual.", "model_ema.visual.")])
def test_a_checkpoint_holding_two_whole_towers_is_refused_instead_of_merging_the_first(prefixes, tmp_path):
    from momaestimator import MOMAMerger
    from momaestimator.checkpoints.openclip import matching_state

    clip = _tiny_clip()
    state = clip.visual.state_dict()
    two = {f"{p}{k}": v + i for i, p in enumerate(prefixes) for k, v in state.items()}
    with pytest.raises(CheckpointError, match="whole tower under several prefixes") as err:
        matching_state(two, state)
    assert all(repr(p) in str(err.value) for p in prefixes)
    path = tmp_path / "two.pt"
    torch.save(two, path)
    heads = {"a": nn.Linear(clip.visual.output_dim, 2)}
    with pytest.raises(CheckpointError, match="several prefixes"):
        MOMAMerger(clip.visual, {"a": path}, heads, n_steps=1).fit({"a": torch.randn(4, 3, 32, 32)})
    one = {k: v for k, v in two.items() if k.startswith(prefixes[1])}  # one tower: read as before
    assert all(torch.equal(matching_state(one, state)[k], state[k] + 1) for k in state)


def test_a_legacy_file_with_a_damaged_magic_number_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "zeroshot.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    raw = bytearray(path.read_bytes())
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]  # the pickled integer opcode
    at = raw.index(magic)
    raw[at + len(magic) - 1] ^= 0x01  # one bit of the magic number
    path.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="Invalid magic number"):
        torch.load(path, weights_only=False)
    for loader in (read_checkpoint, load_legacy_pickle):
        with pytest.raises(CorruptCheckpointError, match="magic number is wrong"):
            loader(path)


def test_a_merger_takes_expert_paths_starting_with_a_tilde(tmp_path, monkeypatch):
    from momaestimator import MOMAMerger

    monkeypatch.setenv("HOME", str(tmp_path))
    clip = _tiny_clip()
    torch.save(clip.visual.state_dict(), tmp_path / "ft.pt")
    heads = {"a": nn.Linear(clip.visual.output_dim, 2)}
    m = MOMAMerger(clip.visual, {"a": "~/ft.pt"}, heads, n_steps=1).fit({"a": torch.randn(4, 3, 32, 32)})
    assert m.n_iter_ == 1
