"""Checkpoint formats in and out: the releases, open_clip towers, safe loading, saving, the merge command.

The files under ``tests/fixtures`` were written by ``tests/fixtures/make_release_fixtures.py`` under
open_clip_torch==2.0.2 with the release's ``src/modeling.py``: they are the releases' exact formats
on a tiny architecture, with the outputs open_clip 2.0.2 computed for them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import pickletools  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
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
from momaestimator.checkpoints.safe_pickle import loads_restricted  # noqa: E402
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
    assert loaded.heads["a"].normalize is False
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
        str(tmp_path),
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "DTD/finetuned.pt" in capsys.readouterr().err


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
